"""`qalign data ...`: dataset tools (synthetic corpus)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("data", help="data tools: synthetic corpus")
    dsub = p.add_subparsers(dest="data_command", required=True)
    synth = dsub.add_parser("synth", help="build the KADID-style synthetic-distortion corpus from pristine photos")
    from ..data import synthetic

    synthetic.add_arguments(synth)
    synth.set_defaults(func=synthetic.run)
