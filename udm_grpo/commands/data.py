"""`udm-grpo data`: prompt data. `data geneval` writes GenEval-schema training metadata over the 80 COCO
classes; `data check` validates a training prompt file and reports tags, lengths, duplicates and overlap."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from ..outputs import check_output, write_lines_atomic
from .common import nonnegative_int, positive_int

MAX_PROMPTS = 10_000_000  # about 1.5 GB and 90 s; more is a mistake, not a data set


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..data.check import TASKS
    from ..data.geneval_prompts import PLURAL_STYLES, TAG_MIX

    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    g = sub.add_parser("geneval", help="write GenEval-schema training metadata (JSONL) over the 80 COCO classes",
                       description="Write N GenEval-schema training records (one JSON object per line, GenEval's "
                       "phrasing), split over tags by a mix, in an order fixed by the seed.")
    g.add_argument("-o", "--output", required=True, help="output .jsonl file")
    g.add_argument("-n", "--num-prompts", type=positive_int, default=50000,
                   help=f"number of records (default 50000, at most {MAX_PROMPTS:,})")
    g.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default 0); same seed, same file")
    g.add_argument("--exclude", metavar="EVAL_METADATA",
                   help="GenEval's evaluation_metadata.jsonl (or a .jsonl/.txt prompt file): its prompts are left out")
    default_mix = ",".join(f"{t}={w}" for t, w in TAG_MIX.items())
    g.add_argument("--mix", metavar="TAG=W,...",
                   help=f"tag weights; tags not named get none (default: GenEval's evaluation mix, {default_mix})")
    g.add_argument("--plurals", choices=PLURAL_STYLES, default="geneval",
                   help="counting prompts' plurals: GenEval's ('two sheeps', the default) or English ('two sheep')")
    g.add_argument("--distinct", action="store_true",
                   help="every record differs: a tag with fewer distinct prompts than its share (counting, colors "
                   "once GenEval's prompts are excluded) gives its excess to the other tags, so the mix bends; by "
                   "default such a tag repeats its prompts and the mix holds")
    g.add_argument("--force", action="store_true", help="replace an existing output file")
    c = sub.add_parser("check", help="validate a training prompt file and report on it",
                       description="Validate a training prompt file for a task (schema errors: exit 2) and report "
                       "prompt counts, tags, lengths, duplicates and overlap with an evaluation file.")
    c.add_argument("file", help="prompt file: .jsonl (GenEval metadata, or records with a 'prompt') or .txt")
    c.add_argument("--task", choices=TASKS, required=True, help="the reward the prompts are for")
    c.add_argument("--eval", metavar="FILE", help="evaluation prompts (.jsonl or .txt) the file must not contain")
    c.add_argument("--strict", action="store_true", help="exit 1 when there are warnings (duplicates, overlap)")


def parse_mix(text: str) -> dict[str, float]:
    from ..data.geneval_prompts import TAGS

    mix: dict[str, float] = {}
    for item in text.split(","):
        tag, sep, weight = item.strip().partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or tag not in TAGS or value < 0 or tag in mix:
            raise UserError(f"--mix item {item.strip()!r} must be TAG=WEIGHT with a weight >= 0, each tag once, "
                            f"for tags among {', '.join(TAGS)}.")
        mix[tag] = value
    return mix


def run_geneval(args) -> int:
    from ..data.geneval_prompts import SPACE, TAGS, excluded_by_tag, generate, record_line
    from ..data.prompts import load_prompts

    if args.num_prompts > MAX_PROMPTS:
        raise UserError(f"-n {args.num_prompts:,} is over the {MAX_PROMPTS:,} records this command writes (about "
                        f"150 bytes each); GenEval's grammar has {sum(SPACE.values()):,} distinct prompts.")
    out = check_output(args.output, "file", args.force, sources=[args.exclude])
    exclude: list[str] = []
    if args.exclude:
        exclude = [r["prompt"] for r in load_prompts(args.exclude)]
        found = sum(len(s) for s in excluded_by_tag(exclude).values())
        print(f"excluding {found} GenEval prompts of the {len(exclude)} prompts in {args.exclude}", file=sys.stderr)
        if not found:
            print(f"udm-grpo data: warning: no prompt of {args.exclude} is a GenEval prompt of the 80 COCO classes; "
                  "nothing was excluded", file=sys.stderr)
    else:
        print("udm-grpo data: warning: overlap with GenEval's evaluation prompts was not checked; pass "
              "--exclude evaluation_metadata.jsonl (GenEval's prompts/evaluation_metadata.jsonl) to leave them out",
              file=sys.stderr)
    mix = parse_mix(args.mix) if args.mix else None
    records, capacity = generate(args.num_prompts, args.seed, mix, exclude, args.plurals, args.distinct)
    write_lines_atomic(out, (record_line(r) for r in records))
    counts = {t: sum(r["tag"] == t for r in records) for t in TAGS}
    parts = []
    for t in TAGS:
        if t in capacity:
            gone = SPACE[t] - capacity[t]
            note = f" (all{f'; {gone} excluded' if gone else ''})" if counts[t] == capacity[t] else (
                f" ({capacity[t]} distinct, repeated)" if counts[t] > capacity[t] else "")
            parts.append(f"{t} {counts[t]}{note}")
    print(f"wrote {len(records)} GenEval-schema records to {out} (seed {args.seed}): {', '.join(parts)}")
    return 0


def run_check(args) -> int:
    from ..data.check import check_file, format_report

    report = check_file(args.file, args.task, args.eval)
    print(format_report(report))
    if report.warnings and args.strict:
        return 1
    return 0


def run(args) -> int:
    return run_geneval(args) if args.action == "geneval" else run_check(args)
