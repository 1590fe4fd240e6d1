"""The `rtp-jax` command: generate, chat, run-batch, serve, bench. Defaults to the embedded model."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from rtp_jax.config import SamplingParams
from rtp_jax.engine.args import EngineArgs


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (the default here)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None,
                   help="per-request seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling_params(ns: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
        min_p=ns.min_p, repetition_penalty=ns.repetition_penalty, seed=ns.sampling_seed, stop=ns.stop,
    )


def _make_llm(ns: argparse.Namespace) -> Any:
    from rtp_jax.llm import LLM

    args = EngineArgs.from_cli_args(ns)
    kw = {k: v for k, v in vars(args).items() if k != "model"}
    return LLM(args.model, **kw)


def cmd_generate(ns: argparse.Namespace) -> int:
    llm = _make_llm(ns)
    params = _sampling_params(ns)
    for out in llm.generate(list(ns.prompt), params, use_tqdm=False):
        if ns.echo:
            print(out.prompt, end="")
        print(out.outputs[0].text)
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    llm = _make_llm(ns)
    params = _sampling_params(ns)
    history: list[dict[str, str]] = []
    if ns.system:
        history.append({"role": "system", "content": ns.system})
    if ns.message:  # one-shot
        history.append({"role": "user", "content": ns.message})
        print(llm.chat(history, params, use_tqdm=False)[0].outputs[0].text)
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        reply = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)


def parse_batch_line(line: str, index: int, defaults: SamplingParams) -> dict[str, Any]:
    """One JSONL request: {"prompt": str} | {"messages": [...]} | {"prompt_token_ids": [...]}, with
    optional sampling fields (max_tokens, temperature, ...) and "id". Errors become {"error": ...}."""
    try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise ValueError("each line must be a JSON object")
        fields = {k: v for k, v in obj.items() if k in SamplingParams.__dataclass_fields__}
        params = defaults.replace(**fields) if fields else defaults
        if "messages" in obj:
            prompt: Any = {"messages": obj["messages"]}
        elif "prompt_token_ids" in obj:
            prompt = {"prompt_token_ids": obj["prompt_token_ids"]}
        elif isinstance(obj.get("prompt"), str):
            prompt = obj["prompt"]
        else:
            raise ValueError("expected 'prompt' (string), 'messages' or 'prompt_token_ids'")
        return {"id": obj.get("id", index), "prompt": prompt, "params": params}
    except (ValueError, TypeError) as e:
        return {"id": index, "error": f"line {index + 1}: {e}"}


def cmd_run_batch(ns: argparse.Namespace) -> int:
    import grain
    from tqdm.auto import tqdm

    with open(ns.input) as f:
        lines = [ln for ln in f if ln.strip()]
    defaults = _sampling_params(ns)
    llm = _make_llm(ns)
    tok = llm.get_tokenizer()

    def prepare(item: tuple[int, str]) -> dict[str, Any]:
        rec = parse_batch_line(item[1], item[0], defaults)
        if "error" in rec:
            return rec
        try:
            p = rec["prompt"]
            if isinstance(p, dict) and "messages" in p:
                text = tok.apply_chat_template(p["messages"], add_generation_prompt=True)
                p = {"prompt_token_ids": tok.encode(text, add_special_tokens=False)}
            _, ids = llm.engine.tokenize_prompt(p)
            llm.engine.core.validate(ids)
            rec["prompt"] = p
        except (ValueError, TypeError, KeyError) as e:
            return {"id": rec["id"], "error": f"line {item[0] + 1}: {e}"}
        return rec

    # grain parses and tokenizes ahead; each window of requests goes to the engine at once.
    dataset = grain.MapDataset.source(list(enumerate(lines))).map(prepare).batch(ns.window, batch_fn=list)
    bar = tqdm(total=len(lines), desc="run-batch")
    with open(ns.output, "w") as out_f:
        for window in dataset:
            ok = [r for r in window if "error" not in r]
            results = iter(llm.generate([r["prompt"] for r in ok], [r["params"] for r in ok], use_tqdm=False)
                           if ok else [])
            for r in window:
                if "error" in r:
                    row: dict[str, Any] = r
                else:
                    o = next(results)
                    row = {"id": r["id"], "text": o.outputs[0].text, "token_ids": o.outputs[0].token_ids,
                           "finish_reason": o.outputs[0].finish_reason,
                           "num_prompt_tokens": len(o.prompt_token_ids)}
                out_f.write(json.dumps(row) + "\n")
            bar.update(len(window))
    bar.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtp-jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one or more prompts")
    g.add_argument("prompt", nargs="+")
    g.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    EngineArgs.add_cli_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="chat with the model (interactive, or one-shot with a message)")
    c.add_argument("message", nargs="?", default=None)
    c.add_argument("--system", default=None, help="system prompt")
    EngineArgs.add_cli_args(c)
    _add_sampling_args(c, max_tokens=256)
    c.set_defaults(func=cmd_chat)

    b = sub.add_parser("run-batch", help="generate for every request of a JSONL file")
    b.add_argument("--input", required=True)
    b.add_argument("--output", required=True)
    b.add_argument("--window", type=int, default=1024, help="requests handed to the engine at once")
    EngineArgs.add_cli_args(b)
    _add_sampling_args(b)
    b.set_defaults(func=cmd_run_batch)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    for module in ("serve.cli", "rtp_jax.bench_cli"):
        _register(module, sub, bench)
    return p


def _register(module: str, sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        return  # that subsystem is not installed in this build
    if hasattr(mod, "register"):
        mod.register(sub)
    if hasattr(mod, "register_bench"):
        mod.register_bench(bench)


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return int(ns.func(ns) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"rtp-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
