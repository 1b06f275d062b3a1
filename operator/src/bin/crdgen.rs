//! Prints the WsCluster CRD as YAML: `cargo run -p wsgate-operator --bin crdgen > crds/wsgate.io_wsclusters.yaml`.

fn main() -> anyhow::Result<()> {
    print!("{}", wsgate_operator::crd_yaml()?);
    Ok(())
}
