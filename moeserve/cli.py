"""`moeserve` command line: each subcommand lives in the module that does the work and exposes
`add_args(parser)` and `main(args)`; this file only wires them (imported lazily, so `moeserve
bench` never imports torch)."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "serve": ("moeserve.server.api", "start an OpenAI-compatible server over an engine process"),
    "router": ("moeserve.router.app", "route requests over several instances"),
    "bench": ("moeserve.bench.client", "load-test a server and report throughput and latency"),
    "generate": ("moeserve.engine.llm", "generate offline, no server"),
    "make-tiny": ("moeserve.models.tiny", "write a tiny random checkpoint in Hugging Face format"),
    "demo": ("moeserve.demo", "build a tiny model, serve it, send requests, print a table"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="moeserve")
    sub = parser.add_subparsers(dest="command", required=True)
    name = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for cmd, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(cmd, help=help_text)
        if cmd == name:  # import only the module that will run
            importlib.import_module(module).add_args(p)
    args = parser.parse_args(argv)
    return importlib.import_module(SUBCOMMANDS[args.command][0]).main(args) or 0


if __name__ == "__main__":
    sys.exit(main())
