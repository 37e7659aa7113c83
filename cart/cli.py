"""The `cart` command: one subcommand per stage, each `--config FILE` plus `key=value` overrides.

It seeds Python, NumPy and torch from `seed` before a stage runs; the stages that must not depend on
what ran before reseed their own draws from the config (training's initial weights and its dropout
per batch, the RQ-VAE, the generators). A stage holds its run folder while it writes it (one writer at a
time). Errors meant for the user (CartError), a file the system refuses and memory that runs out print
as one line, without a traceback, and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import sys
import time

from cart.errors import CartError

# subcommand -> (module with run(cfg) -> Path, what it does)
STAGES = {
    "corpus": ("cart.data.corpus", "read a dataset source, check it, write corpus.jsonl"),
    "embed": ("cart.encoders.embed", "embed every corpus item, write embeddings.safetensors"),
    "ids": ("cart.index.build_ids", "turn embeddings into unique semantic identifiers and their prefix trie"),
    "caption": ("cart.caption", "generate captions of the corpus images as extra training texts"),
    "train": ("cart.train", "train the CART model: query text -> identifier (accelerate launch -m cart train ...)"),
    "eval": ("cart.eval.evaluate", "R@1/5/10 and MRR@10 of CART and the baselines on the held-out queries, an HTML report"),
    "pipeline": ("cart.pipeline", "run every stage in order (the demo)"),
}
# stages whose output later stages are built from: replacing it takes --force
FORCE = {"corpus": "replace the run's corpus even when later stages were built from it",
         "embed": "recompute the embeddings even when later stages were built from them",
         "ids": "rebuild the identifiers even when a model was trained on them",
         "caption": "caption again even when a model was trained on the captions",
         "pipeline": "let every stage replace what later stages were built from"}
RETRIEVE_HELP = "ranked items for query texts (arguments, --file, or one a line on stdin)"
ADD_HELP = "add items to a trained run without training again (any source `cart corpus` reads)"
REMOVE_HELP = "remove items from a run: gone from the corpus and the trie"
SERVE_HELP = "answer queries over HTTP (POST /search, POST /items, GET /health, GET /info)"
GENERATE_HELP = "retrieve images for a prompt and generate from them (preview, OmniGen, SDXL + IP-Adapter)"


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other error of `cart` (the usage is in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as `cart` reads it; a bad one exits with code 2 and a one-line error."""
    parser = Parser(prog="cart", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in STAGES.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", help="a YAML config (default: built-in defaults)")
        sub.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="config overrides, e.g. embed.batch_size=16")
        if name == "corpus":
            sub.add_argument("--on-bad", choices=("stop", "skip"), help="stop at the first bad item (default) or skip bad items")
        if name in FORCE:
            sub.add_argument("--force", action="store_true", help=FORCE[name])
        if name == "train":
            sub.add_argument("--continue", dest="continue_training", action="store_true",
                             help="train the run's model further on the items `cart add` added, replaying old ones")
    retrieve = commands.add_parser("retrieve", help=RETRIEVE_HELP, description=RETRIEVE_HELP)
    retrieve.add_argument("--run", required=True, help="a trained run folder, e.g. checkpoints/emoji")
    retrieve.add_argument("queries", nargs="*", metavar="QUERY")
    retrieve.add_argument("--file", help="a text file of queries, one a line ('-' for stdin)")
    retrieve.add_argument("-k", type=positive, default=None, help="items per query (default: the run's retrieve.top_k)")
    retrieve.add_argument("--beams", type=positive, default=None, help="beam width (default: the run's; at least k)")
    retrieve.add_argument("--batch-size", type=positive, default=None,
                          help="queries decoded together (default: the run's retrieve.batch_size)")
    retrieve.add_argument("--json", action="store_true", help="one JSON object a query instead of a table")
    retrieve.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=None,
                          help="re-rank the beam's candidates by embedding cosine (default: the run's retrieve.rerank)")
    retrieve.add_argument("--rerank-candidates", type=positive, default=None,
                          help="beams whose candidates rerank re-orders (default: the run's retrieve.rerank_candidates)")
    add = commands.add_parser("add", help=ADD_HELP, description=ADD_HELP)
    add.add_argument("--run", required=True, help="a run folder with identifiers, e.g. checkpoints/emoji")
    add.add_argument("--corpus", required=True, metavar="PATH", help="the new items: a manifest (.jsonl, .csv), a "
                                                                    "folder of media, or a Karpathy or COCO JSON")
    add.add_argument("--source", choices=("manifest", "folder", "karpathy", "coco"),
                     help="how to read PATH (default: folder for a folder, manifest for .jsonl/.csv)")
    add.add_argument("--on-bad", choices=("stop", "skip"), help="stop at the first bad item (default) or skip bad items")
    add.add_argument("--dry-run", action="store_true", help="print what would be added, write nothing")
    add.add_argument("overrides", nargs="*", default=[], metavar="corpus.key=value",
                     help="corpus settings for reading PATH, e.g. corpus.media_root=DIR")
    remove = commands.add_parser("remove", help=REMOVE_HELP, description=REMOVE_HELP)
    remove.add_argument("--run", required=True, help="a run folder, e.g. checkpoints/emoji")
    remove.add_argument("item_ids", nargs="+", metavar="ID", help="the ids of the items to remove")
    remove.add_argument("--dry-run", action="store_true", help="print what would be removed, write nothing")
    serve = commands.add_parser("serve", help=SERVE_HELP, description=SERVE_HELP)
    serve.add_argument("--run", required=True, help="a trained run folder, e.g. checkpoints/emoji")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    serve.add_argument("--port", type=positive, default=8000)
    serve.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=None,
                       help="load rerank (default: the run's retrieve.rerank); requests choose per search")
    serve.add_argument("--rerank-candidates", type=positive, default=None,
                       help="beams whose candidates rerank re-orders (default: the run's retrieve.rerank_candidates)")
    serve.add_argument("--batch-size", type=positive, default=None,
                       help="queries decoded together at most (default: the run's retrieve.batch_size)")
    serve.add_argument("--wait-ms", type=float, default=2.0,
                       help="how long the first waiting request waits for others to share its batch (default 2)")
    generate = commands.add_parser("generate", help=GENERATE_HELP, description=GENERATE_HELP)
    generate.add_argument("prompt")
    generate.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="config overrides, e.g. generate.images=2")
    generate.add_argument("--run", help="a trained run folder (default: the config's)")
    generate.add_argument("--config", help="a YAML config (default: built-in defaults)")
    generate.add_argument("--subquery", action="append", default=[],
                          help="a sub-query (repeat it; sub-query mode); --split splits the prompt instead")
    generate.add_argument("--split", action="store_true", help="sub-query mode, sub-queries split from the prompt")
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow options too (`cart generate "a prompt" --run DIR generate.images=2`)
    unknown = [x for x in extra if "=" not in x or x.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.command == "retrieve":
        return _guarded("retrieve", lambda: _retrieve(args))
    if args.command == "generate":
        return _guarded("generate", lambda: _generate(args))
    if args.command in ("add", "remove"):
        return _guarded(args.command, lambda: _update(args))
    if args.command == "serve":
        return _guarded("serve", lambda: _serve(args))
    overrides = list(args.overrides)
    if getattr(args, "on_bad", None):
        overrides.append(f"corpus.on_bad={args.on_bad}")
    options = {"force": args.force} if args.command in FORCE else {}
    if args.command == "train":
        options["continue_training"] = args.continue_training
    _guarded(args.command, lambda: _stage(args.command, args.config, overrides, options))


def _guarded(command: str, work) -> None:
    """Run `work`, turning errors meant for the user into one line on stderr."""
    try:
        work()
    except CartError as e:
        _fail(command, str(e))
    except BrokenPipeError:  # the reader went away (`cart retrieve ... | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        sys.exit(1)
    except OSError as e:  # the system refused a file: a read-only folder, a full disk, a path under /proc
        _fail(command, f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e))
    except MemoryError:
        _fail(command, "ran out of memory: lower the sizes (ids.*, model.*) or batch sizes of the config")
    except RuntimeError as e:  # torch's allocators raise RuntimeError
        if "can't allocate memory" not in str(e) and "out of memory" not in str(e):
            raise
        _fail(command, f"ran out of memory ({str(e).splitlines()[0][:200]}): lower the sizes (ids.*, model.*) or "
                       f"batch sizes of the config")
    except KeyboardInterrupt:
        print(f"cart {command}: interrupted", file=sys.stderr)
        sys.exit(130)


def _fail(command: str, message: str) -> None:
    print(f"cart {command}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _stage(command: str, config: str | None, overrides: list[str], options: dict) -> None:
    from cart import files
    from cart.config import load_config

    cfg = load_config(config, overrides, named=True)
    _seed(cfg.seed)
    module = importlib.import_module(STAGES[command][0])
    start = time.perf_counter()
    with files.run_lock(cfg.run_dir, f"cart {command}"):
        module.run(cfg, **options)
    if os.environ.get("RANK", "0") == "0":  # under `accelerate launch`, the first process reports
        print(f"cart {command}: done in {time.perf_counter() - start:.1f} s")


def _generate(args) -> None:
    from cart.config import load_config

    overrides = list(args.overrides)
    if args.subquery or args.split:
        overrides.append("generate.mode=subqueries")
    cfg = load_config(args.config, overrides, named=args.run is None)  # before the heavy imports: fails at once
    from cart.generate import generate

    cfg.generate.subqueries = args.subquery or cfg.generate.subqueries
    _seed(cfg.seed)
    generate.run(cfg, prompt=args.prompt, run_dir=args.run)


def _update(args) -> None:
    """`cart add` and `cart remove`: a new version of the run's corpus, embeddings and identifiers."""
    from pathlib import Path

    from cart import files
    from cart.index import update

    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise CartError(f"run folder not found: {run_dir}")
    with files.run_lock(run_dir, f"cart {args.command}"):
        if args.command == "remove":
            change = update.remove(run_dir, args.item_ids, args.dry_run)
        else:
            source = args.source or ("folder" if Path(args.corpus).is_dir() else "manifest"
                                     if Path(args.corpus).suffix.lower() in (".jsonl", ".csv") else None)
            if source is None:
                raise CartError(f"--corpus {args.corpus}: say how to read it with --source (karpathy or coco for a JSON)")
            overrides = [f"corpus.source={source}", f"corpus.path={args.corpus}", *args.overrides]
            if args.on_bad:
                overrides.append(f"corpus.on_bad={args.on_bad}")
            change = update.add(run_dir, overrides, args.dry_run)
    print(update.describe(change, args.command, args.dry_run))


def _serve(args) -> None:
    if args.port > 65535:
        raise CartError(f"--port must be at most 65535, got {args.port}")
    if not 0 <= args.wait_ms <= 1000:
        raise CartError(f"--wait-ms must be from 0 to 1000, got {args.wait_ms}")
    from importlib.util import find_spec

    if find_spec("fastapi") is None or find_spec("uvicorn") is None:
        raise CartError("cart serve needs FastAPI and uvicorn: pip install 'cart[serve]'")
    from transformers.utils import logging as transformers_logging

    from cart.retrieve.serve import serve

    transformers_logging.disable_progress_bar()
    serve(args.run, args.host, args.port, args.rerank, args.rerank_candidates, args.batch_size, args.wait_ms)


def _retrieve(args) -> None:
    import json

    from cart.retrieve.retriever import Retriever, format_hits

    queries = list(args.queries)
    if args.file:
        try:
            text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise CartError(f"--file {args.file}: cannot read it: {e}") from None
        queries += [line.strip() for line in text.splitlines() if line.strip()]
    elif not queries:
        queries = [line.strip() for line in sys.stdin if line.strip()]
    if not queries:
        raise CartError("no query: give query texts as arguments, with --file, or on stdin")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no "Loading weights" bar in front of the results
    retriever = Retriever.load(args.run, beam_width=args.beams, rerank=args.rerank,
                               rerank_candidates=args.rerank_candidates)
    for query, hits in zip(queries, retriever.search(queries, k=args.k, batch_size=args.batch_size)):
        warning = retriever.warning(query)
        if warning:
            print(f"cart retrieve: warning: {warning}", file=sys.stderr)
        print(json.dumps({"query": query, "hits": [vars(h) for h in hits]} | ({"warning": warning} if warning else {}),
                         ensure_ascii=False) if args.json else format_hits(query, hits))



def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
