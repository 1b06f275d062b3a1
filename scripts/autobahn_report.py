#!/usr/bin/env python3
"""Summarises an Autobahn|Testsuite fuzzingclient run (used by scripts/autobahn).

    autobahn_report.py REPORTS_DIR EXPECTED_CASES_FILE [--markdown]

Reads REPORTS_DIR/index.json and the per-case files (only they hold the result text), prints
the count of each result, every case that is not OK with its result text, and the cases that
were expected but have no result (the suite silently skips the remaining cases after a refused
connection). Exits 1 on any FAILED or missing case. With --markdown, also prints a table of
results per section for docs/protocol.md.
"""

import collections
import json
import os
import re
import sys

RESULTS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]


def case_key(case_id):
    return [int(part) for part in case_id.split(".")]


def first_line(html):
    """A case description's first line, without its HTML."""
    text = re.sub(r"<[^>]+>", "\n", html or "")
    line = next((l.strip() for l in text.splitlines() if l.strip()), "")
    return line if len(line) <= 100 else line[:97] + "..."


def worst(behavior, behavior_close):
    """A case's result: its behaviour, unless its closing behaviour did worse."""
    if "FAILED" in (behavior, behavior_close):
        return "FAILED"
    return behavior


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    reports, expected_file = argv[1], argv[2]
    markdown = "--markdown" in argv[3:]
    with open(expected_file) as f:
        expected = [line.strip() for line in f if line.strip()]

    index_path = os.path.join(reports, "index.json")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        print("autobahn: no usable %s (%s): every case is missing" % (index_path, e))
        index = {}
    # One agent per run.
    cases = next(iter(index.values()), {})

    counts = collections.Counter()
    not_ok = []
    per_section = collections.defaultdict(collections.Counter)
    for case_id in sorted(cases, key=case_key):
        entry = cases[case_id]
        result = worst(entry.get("behavior"), entry.get("behaviorClose"))
        counts[result] += 1
        per_section[case_id.split(".")[0]][result] += 1
        if result != "OK":
            detail = {}
            try:
                with open(os.path.join(reports, entry["reportfile"])) as f:
                    detail = json.load(f)
            except (OSError, ValueError, KeyError):
                pass
            not_ok.append((case_id, result, entry, detail))

    missing = [c for c in expected if c not in cases]
    unexpected = [c for c in cases if c not in set(expected)]

    print("Autobahn|Testsuite: %d of %d expected cases reported" % (len(cases), len(expected)))
    for result in RESULTS:
        print("  %-14s %4d" % (result, counts[result]))
    for result in sorted(set(counts) - set(RESULTS)):
        print("  %-14s %4d" % (result, counts[result]))
    if not_ok:
        print("\nCases that are not OK:")
        for case_id, result, entry, detail in not_ok:
            print("  %-8s %-13s %s" % (case_id, result, first_line(detail.get("description"))))
            print("           result: %s" % detail.get("result", "?"))
            if entry.get("behaviorClose") != "OK":
                print("           close (%s): %s" % (entry.get("behaviorClose"),
                                                     detail.get("resultClose", "?")))
    if missing:
        print("\nMissing cases (%d): %s" % (len(missing), " ".join(missing)))
    if unexpected:
        print("\nCases reported but not expected: %s" % " ".join(unexpected))

    if markdown:
        print("\n| section | cases | " + " | ".join(RESULTS) + " |")
        print("|---|---|" + "---|" * len(RESULTS))
        for section in sorted(per_section, key=int):
            c = per_section[section]
            print("| %s | %d | %s |" % (section, sum(c.values()),
                                        " | ".join(str(c[r]) for r in RESULTS)))
        print("| all | %d | %s |" % (sum(counts.values()),
                                     " | ".join(str(counts[r]) for r in RESULTS)))

    failed = counts["FAILED"] > 0 or bool(missing) or not expected
    print("\nautobahn: %s" % ("FAILED" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
