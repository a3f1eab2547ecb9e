"""Generate per-class descriptions with an OpenAI-compatible chat-completions endpoint.

    OPENAI_API_KEY=... python -m text_features.describe --dataset cifar10 --out cifar10_descriptions.json

The endpoint is ``OPENAI_BASE_URL`` (default https://api.openai.com/v1) with ``OPENAI_API_KEY``; local
servers (vLLM, llama.cpp, Ollama) work the same way. The output is cached: a rerun only asks for the
classes still missing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cli_shell import run_cli

from .classes import class_names_for
from .errors import TextFeaturesError
from .llm import DEFAULT_MODEL, ChatClient, describe_classes
from .templates import questions_for


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="dataset whose class names to describe (see data.DATASETS)")
    p.add_argument("--class-names", metavar="FILE", help="text file with one class name per line (instead of --dataset)")
    p.add_argument("--out", required=True, metavar="FILE.json", help="descriptions cache (created or completed)")
    p.add_argument("--per-question", type=int, default=10, metavar="N",
                   help="descriptions per question and class (CuPL used 10; default %(default)s)")
    p.add_argument("--question", action="append", dest="questions", metavar="TEMPLATE",
                   help="question template with {} for the class name (repeatable; default: the dataset's set)")
    p.add_argument("--llm-model", default=DEFAULT_MODEL, help="model name sent to the endpoint (default %(default)s)")
    p.add_argument("--base-url", default=None, help="endpoint base URL (default: $OPENAI_BASE_URL or OpenAI's)")
    p.add_argument("--temperature", type=_optional_float, default=0.99,
                   help="sampling temperature (CuPL: 0.99; 'none' = do not send, for models that reject it)")
    p.add_argument("--max-tokens", type=int, default=80, help="max tokens per answer (0 = do not send)")
    p.add_argument("--n-per-request", type=int, default=None, metavar="N",
                   help="choices asked per request (default: --per-question; 1 for servers without 'n')")
    p.add_argument("--rate-limit", type=float, default=0.0, metavar="R",
                   help="at most R requests per second (0 = unlimited)")
    p.add_argument("--max-retries", type=int, default=5, help="retries on HTTP 429/5xx and timeouts")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_cli(lambda: describe(args))


def describe(args: argparse.Namespace) -> None:
    """Ask the LLM for the descriptions the parsed options name and save them."""
    if args.per_question < 1:
        raise TextFeaturesError("--per-question must be at least 1")
    names = class_names_for(args.dataset, args.class_names)
    questions = args.questions or list(questions_for(args.dataset))
    if any("{}" not in q for q in questions):
        raise TextFeaturesError("every --question needs a {} where the class name goes")
    client = ChatClient.from_env(args.llm_model, args.base_url, timeout=args.timeout,
                                 max_retries=args.max_retries, rate_limit=args.rate_limit)
    if not client.api_key and "api.openai.com" in client.base_url:
        raise TextFeaturesError("set OPENAI_API_KEY, or OPENAI_BASE_URL to a server that needs no key")
    result = describe_classes(
        client, names, questions, args.out, per_question=args.per_question,
        n_per_request=args.n_per_request, temperature=args.temperature, max_tokens=args.max_tokens,
        dataset=args.dataset, progress=not args.no_progress,
    )
    counts = [len(result.descriptions.get(n, [])) for n in names]
    print(f"{args.out}: {len(names)} classes, {min(counts)}-{max(counts)} descriptions per class, "
          f"{client.requests_sent} requests this run")


if __name__ == "__main__":
    sys.exit(main())
