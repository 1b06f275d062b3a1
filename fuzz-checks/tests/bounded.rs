//! Every fuzz check, run within `cargo test`: on each committed seed (`fuzz/seeds/TARGET/`),
//! then on mutations of them — bit flips, interesting bytes, JSON and frame tokens, inserted,
//! deleted and repeated ranges, splices of two seeds — from a fixed-seed generator, so the
//! inputs are the same on every machine. Each target stops after [`RUNS`] mutated inputs or
//! [`BUDGET`], whichever comes first (a slow machine runs a prefix of the same sequence; no
//! time is asserted).
//!
//! This is not coverage-guided fuzzing (that is `make fuzz`, docs/fuzzing.md); it keeps every
//! check compiling and passing on each commit, and catches what a few thousand blind
//! mutations of the seeds reach. A failing input is written out and its path printed, ready
//! for `cargo fuzz run -s none TARGET PATH`.
//!
//! `WSGATE_FUZZ_RUNS` and `WSGATE_FUZZ_SECS` change the bounds, `WSGATE_FUZZ_SEED` the
//! sequence.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wsgate_fuzz_checks::{Check, TARGETS};

/// Mutated inputs per target.
const RUNS: u64 = 200_000;
/// Wall-clock bound per target: keeps the run short on a slow or busy machine.
const BUDGET: Duration = Duration::from_secs(5);
/// The longest input tried (the seeds are far shorter).
const MAX_LEN: usize = 4096;

/// Bytes that sit on the edges of the parsers' rules: lengths 125/126/127, opcodes, UTF-8 lead
/// and continuation bytes, JSON structure.
const BYTES: &[u8] = &[
    0, 1, 2, 8, 9, 10, 0x0f, 0x40, 0x7d, 0x7e, 0x7f, 0x80, 0x81, 0x88, 0xbf, 0xc0, 0xe0, 0xef,
    0xf0, 0xf4, 0xff, b'"', b'\\', b'{', b'}', b'[', b']', b':', b',',
];

/// Tokens the JSON parsers and the frame reader treat specially.
const TOKENS: &[&[u8]] = &[
    b"null",
    b"true",
    b"1e999",
    b"-0",
    b"18446744073709551616",
    b"\\u0000",
    b"\\ud800",
    b"\\\"",
    b"{}",
    b"[]",
    b"\"topic\":",
    b"\"socketId\":",
    b"\"message\":",
    b"\"name\":",
    b"\"data\":",
    b"\"binary\":",
    b"\"since\":{}",
    b"\"type\":\"room.join\"",
    b"__socket__:",
    b"__broadcast__",
    b"\xc3\xa9",
    b"\xf0\x9f\x98\x80",
    b"\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\x88\x82",
    b"\x89\x80",
    b"\x03\xe8",
];

/// splitmix64: a small, well-distributed generator with a fixed sequence per seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// Applies one random mutation to `input`.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], input: &mut Vec<u8>) {
    let at = |rng: &mut Rng, len: usize| rng.below(len + 1);
    match rng.below(10) {
        0 if !input.is_empty() => {
            let i = rng.below(input.len());
            input[i] ^= 1 << rng.below(8);
        }
        1 if !input.is_empty() => {
            let i = rng.below(input.len());
            input[i] = rng.byte();
        }
        2 if !input.is_empty() => {
            let i = rng.below(input.len());
            input[i] = BYTES[rng.below(BYTES.len())];
        }
        3 => {
            let i = at(rng, input.len());
            let n = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
            input.splice(i..i, bytes);
        }
        4 if !input.is_empty() => {
            let start = rng.below(input.len());
            let end = start + 1 + rng.below((input.len() - start).min(16));
            input.drain(start..end);
        }
        5 if !input.is_empty() => {
            // A range repeated: long strings, many fragments, deep nesting.
            let start = rng.below(input.len());
            let end = start + 1 + rng.below((input.len() - start).min(64));
            let range = input[start..end].to_vec();
            let times = 1 + rng.below(32);
            let i = at(rng, input.len());
            input.splice(i..i, range.repeat(times));
        }
        6 if !seeds.is_empty() => {
            // Splice: this input's head, another seed's tail.
            let other = &seeds[rng.below(seeds.len())];
            let keep = at(rng, input.len());
            let from = at(rng, other.len());
            input.truncate(keep);
            input.extend_from_slice(&other[from..]);
        }
        7 | 8 => {
            let i = at(rng, input.len());
            input.splice(i..i, TOKENS[rng.below(TOKENS.len())].iter().copied());
        }
        _ if !input.is_empty() => {
            input.truncate(rng.below(input.len()));
        }
        _ => input.push(rng.byte()),
    }
    input.truncate(MAX_LEN);
}

fn seeds_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target)
}

/// The target's seeds, sorted by file name (the order is part of the fixed sequence).
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = seeds_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a seed folder entry").path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let name = path
                .file_name()
                .expect("a file name")
                .to_string_lossy()
                .into();
            (name, std::fs::read(&path).expect("a readable seed"))
        })
        .collect()
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

/// Runs `check` on `input`; when it panics, writes the input out and fails with its path.
fn check_one(target: &str, check: Check, input: &[u8], what: &str) {
    if catch_unwind(AssertUnwindSafe(|| check(input))).is_ok() {
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    std::fs::create_dir_all(&dir).expect("a folder for the failing input");
    let path = dir.join(format!("{target}-{}", what.replace([' ', '/'], "-")));
    std::fs::write(&path, input).expect("the failing input written out");
    let shown: String = input.iter().take(256).map(|b| format!("{b:02x}")).collect();
    panic!(
        "{target} failed on {what} ({} bytes, above the panic): {shown}\n\
         the input is in {}; replay it with `cd fuzz && cargo fuzz run -s none {target} {}`",
        input.len(),
        path.display(),
        path.display()
    );
}

fn run_target(target: &str) {
    let (_, check) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a target of wsgate_fuzz_checks::TARGETS");
    let named = seeds(target);
    assert!(!named.is_empty(), "{target} has no seeds");
    for (name, input) in &named {
        check_one(target, *check, input, &format!("seed {name}"));
    }

    let seeds: Vec<Vec<u8>> = named.into_iter().map(|(_, input)| input).collect();
    let runs = env_number("WSGATE_FUZZ_RUNS").unwrap_or(RUNS);
    let budget = env_number("WSGATE_FUZZ_SECS").map_or(BUDGET, Duration::from_secs);
    // One sequence per target, so that adding a target changes no other's inputs.
    let salt = target.bytes().fold(0u64, |h, b| {
        h.wrapping_mul(0x100_0000_01B3).wrapping_add(u64::from(b))
    });
    let mut rng = Rng(env_number("WSGATE_FUZZ_SEED").unwrap_or(0x5EED) ^ salt);
    let started = Instant::now();
    let mut input = Vec::new();
    let mut done = 0;
    while done < runs && started.elapsed() < budget {
        // Mostly a fresh seed; sometimes the last input again, so mutations stack up.
        if done == 0 || rng.below(4) != 0 {
            input.clone_from(&seeds[rng.below(seeds.len())]);
        }
        for _ in 0..=rng.below(4) {
            mutate(&mut rng, &seeds, &mut input);
        }
        check_one(target, *check, &input, &format!("mutation {done}"));
        done += 1;
    }
    println!(
        "{target}: {} seeds and {done} mutations in {:.1} s",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn frame_reader() {
    run_target("frame_reader");
}

#[test]
fn client_command() {
    run_target("client_command");
}

#[test]
fn redis_envelope() {
    run_target("redis_envelope");
}

#[test]
fn publish_body() {
    run_target("publish_body");
}

#[test]
fn inflater() {
    run_target("inflater");
}

/// Every check has its test above, its seeds and its cargo-fuzz target, and nothing else
/// does: a target added in one place only fails here.
#[test]
fn every_target_is_wired_everywhere() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let listed = |dir: &Path, suffix: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| {
                entry
                    .expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter_map(|name| name.strip_suffix(suffix).map(str::to_owned))
            .collect();
        names.sort();
        names
    };
    let mut targets: Vec<String> = TARGETS.iter().map(|(name, _)| (*name).to_owned()).collect();
    targets.sort();
    assert_eq!(listed(&root.join("seeds"), ""), targets, "fuzz/seeds/");
    assert_eq!(
        listed(&root.join("fuzz_targets"), ".rs"),
        targets,
        "fuzz/fuzz_targets/"
    );
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("fuzz/Cargo.toml");
    let tests = include_str!("bounded.rs");
    for target in &targets {
        assert!(
            manifest.contains(&format!("name = \"{target}\"")),
            "{target} has no [[bin]] in fuzz/Cargo.toml"
        );
        let wrapper = std::fs::read_to_string(root.join(format!("fuzz_targets/{target}.rs")))
            .expect("the target's file");
        assert!(
            wrapper.contains(&format!("wsgate_fuzz_checks::{target}::run")),
            "fuzz/fuzz_targets/{target}.rs does not run its check"
        );
        assert!(
            tests.contains(&format!("run_target(\"{target}\")")),
            "{target} has no test in fuzz-checks/tests/bounded.rs"
        );
    }
}
