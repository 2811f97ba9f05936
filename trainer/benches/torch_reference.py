#!/usr/bin/env python3
"""The PyTorch + transformers + peft side of `etpo bench model`.

Measures, on the same GGUF and with the same inputs as etpo's side (the prompt's token ids come
from etpo), in one of two modes:
  - by default, one LoRA training step (peft, rank --rank, all 7 projections, alpha 2*rank, no
    dropout): forward, mean next-token cross-entropy, backward, AdamW step, on --train-batch x
    --train-len token ids given by the same formula etpo uses; --repeats timed steps after a
    warm-up. Prints one JSON object on the last line of standard output;
  - with --serve, generation on request, so that etpo can take turns with it run by run (a change
    in the machine's speed then falls on both sides alike): exactly --new-tokens tokens per row
    (EOS suppressed with min_new_tokens), temperature/top-k sampling, KV cache, prompt included.
    After loading, one JSON line {"ready": true, ...}; then for each line {"batch": B, "seed": S}
    read from standard input, one timed generation and one line {"seconds": ...}; at the end of
    input, {"peak_rss_mb": ...}.
Needs `scripts/setup.sh ref`.
"""

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF de-quantisation progress bar
warnings.filterwarnings("ignore", category=FutureWarning)


def train_ids(batch: int, length: int, vocab: int) -> list:
    # Must match `train_ids` in src/commands/bench_model.rs.
    return [[(b * 7919 + t * 104729 + 13) % vocab for t in range(length)] for b in range(batch)]


def peak_rss_mb():
    """This process's peak resident memory. Not ru_maxrss: Linux carries that over from the parent
    across fork and exec, so it would report etpo's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--prompt-ids", type=Path, required=True, help="JSON list of the prompt's token ids")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-len", type=int, default=320)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--serve", action="store_true", help="generate on request (see the module documentation)")
    args = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    torch.manual_seed(0)
    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(args.gguf.parent), gguf_file=args.gguf.name)  # for the pad id
    model = AutoModelForCausalLM.from_pretrained(str(args.gguf.parent), gguf_file=args.gguf.name, dtype=dtype)
    model.to(device)
    model.eval()
    load_s = time.perf_counter() - started
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "dtype": args.dtype,
        "load_s": load_s,
    }

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # etpo's tokenizer made these ids: both sides run on exactly the same tokens.
    ids = torch.tensor([json.loads(args.prompt_ids.read_text())], device=device)

    def generate_once(batch: int, seed: int) -> float:
        """Seconds of one generation of --new-tokens tokens for `batch` copies of the prompt."""
        x = ids.repeat(batch, 1)
        torch.manual_seed(seed)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                do_sample=True,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=1.0,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=tok.pad_token_id,
            )
        sync()
        dt = time.perf_counter() - t0
        assert out.shape[1] - x.shape[1] == args.new_tokens, out.shape
        return dt

    if args.serve:
        print(json.dumps({"ready": True, **result}), flush=True)
        for line in sys.stdin:
            if line.strip():
                request = json.loads(line)
                print(json.dumps({"seconds": generate_once(int(request["batch"]), int(request["seed"]))}), flush=True)
        print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)
        return

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(
        model,
        LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=targets),
    )
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    x = torch.tensor(train_ids(args.train_batch, args.train_len, vocab), device=device)
    times = []
    for rep in range(args.repeats + 1):
        sync()
        t0 = time.perf_counter()
        logits = peft_model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        if rep > 0:
            times.append(dt)
        del logits, loss
    result["train"] = {
        "batch": args.train_batch,
        "tokens": args.train_len,
        "rank": args.rank,
        "trainable_parameters": sum(p.numel() for p in params),
        "seconds": times,
        "step_s": statistics.median(times),
    }
    print(f"torch LoRA step: {statistics.median(times):.2f} s", file=sys.stderr)

    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
