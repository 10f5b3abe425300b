"""`rsae cache`: cache LM activations at hook points (resumable, checksummed shards)."""

from __future__ import annotations

import argparse
import json

from rsae.data.cache import CACHE_DTYPES
from rsae.data.caching import CacheRequest, build_cache


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="cache folder: a path, file:// or any fsspec URL")
    parser.add_argument("--model", default="smollm2-135m",
                        help="'smollm2-135m' (built in, offline), a local Hugging Face folder or a Hub name")
    parser.add_argument("--hook", dest="hooks", action="append", default=None, metavar="HOOK",
                        help="TransformerLens hook point, repeatable (default blocks.15.hook_resid_post; "
                             "`rsae hooks MODEL` lists them)")
    parser.add_argument("--corpus", default="shakespeare",
                        help="'shakespeare' (built in), a .txt/.jsonl file or folder, or hf:NAME[:CONFIG][:SPLIT]")
    parser.add_argument("--n-tokens", type=int, default=100_000, help="tokens to cache, BOS positions included")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, BOS included")
    parser.add_argument("--sequences-per-shard", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per LM forward")
    parser.add_argument("--dtype", choices=CACHE_DTYPES, default="bfloat16", help="storage dtype of activations")
    parser.add_argument("--no-autocast-bf16", dest="autocast_bf16", action="store_false",
                        help="run the LM in fp32 instead of bf16 autocast")
    parser.add_argument("--allow-nonfinite", action="store_true", help="keep NaN/Inf activations (counted)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--lm-processing", type=json.loads, default=None, metavar="JSON",
                        help="HookedTransformer weight processing of the LM, e.g. '{\"center_writing_weights\": true}' "
                             "(what SAELens-trained SAEs expect; default: the model's own weights)")


def run(args: argparse.Namespace) -> int:
    request = CacheRequest(out=args.out, model=args.model, hooks=tuple(args.hooks or ("blocks.15.hook_resid_post",)),
                           corpus=args.corpus, n_tokens=args.n_tokens, seq_len=args.seq_len,
                           sequences_per_shard=args.sequences_per_shard, batch_size=args.batch_size,
                           dtype=args.dtype, autocast_bf16=args.autocast_bf16, allow_nonfinite=args.allow_nonfinite,
                           device=args.device, progress=args.progress, lm_processing=args.lm_processing)
    build_cache(request)
    return 0
