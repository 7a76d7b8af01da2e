"""Peak memory (RSS) per process of `mmdit-diffusers train --cache_latents --cache_text_embeddings`, by dataset size
and number of processes, for this checkout's `src/` and, with `--before SRC`, another source tree (e.g. the code
before the disk caches: `git archive <commit> src | tar -x -C /tmp/before`).

Each run: a synthetic imagefolder of N tiny images (16 x 16 PNG, `--distinct` distinct captions cycled), the tiny
test pipeline (tests/tiny_pipeline.py: VAE scale 2, CLIPs of width 32, T5 of width 64), `--resolution 16`, 2
optimizer steps, under `accelerate launch` (`--multi_gpu` with ACCELERATE_USE_CPU=1 for 2 processes). The cache
build is what the numbers measure: the steps themselves are tiny. Every process writes its own peak RSS (VmHWM,
`ru_maxrss`) at exit. With the new code each case also runs a second time in the same output folder ("rerun"),
which finds and reuses the cache.

    nice -n 10 .venv/bin/python benchmarks/bench_cache_memory.py --images 20000 100000 --processes 1 2 \
        --before /tmp/before/src --json benchmarks/results/cpu_cache_memory.json

Run by hand (minutes per case on 2 cores); the tests never time anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRAPPER = """import atexit, json, os, resource, sys
def record():
    with open(os.path.join({out!r}, "rss-" + os.environ.get("RANK", "0") + ".json"), "w") as f:
        json.dump({{"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}, f)
atexit.register(record)
from mmdit_diffusers.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


def write_images(root: str, n: int, distinct: int) -> str:
    """n 16 x 16 PNGs (a coloured square on a random background) with `distinct` captions cycled."""
    from PIL import Image

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny_pipeline import WORDS

    if os.path.isfile(os.path.join(root, "metadata.jsonl")):
        return root
    os.makedirs(root, exist_ok=True)
    rng = random.Random(0)
    captions = [" ".join(rng.choice(WORDS) for _ in range(6)) + f" {k}" for k in range(distinct)]
    with open(os.path.join(root, ".metadata.jsonl"), "w", encoding="utf-8") as f:
        for i in range(n):
            image = Image.new("RGB", (16, 16), tuple(rng.randrange(256) for _ in range(3)))
            image.paste(tuple(rng.randrange(256) for _ in range(3)), (4, 4, 12, 12))
            name = f"{i // 10000:02d}/{i:06d}.png"
            os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
            image.save(os.path.join(root, name))
            f.write(json.dumps({"file_name": name, "text": captions[i % distinct]}) + "\n")
    os.replace(os.path.join(root, ".metadata.jsonl"), os.path.join(root, "metadata.jsonl"))
    return root


def run_case(src: str, base: str, data: str, out: str, processes: int, workdir: str) -> dict:
    rss_dir = tempfile.mkdtemp(dir=workdir, prefix="rss-")
    wrapper = os.path.join(rss_dir, "train_and_record.py")
    with open(wrapper, "w") as f:
        f.write(WRAPPER.format(out=rss_dir))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:
        launch += ["--multi_gpu", "--main_process_port", str(29500 + random.randrange(1000))]
    argv = ["--pretrained_model_name_or_path", base, "--train_data_dir", data, "--output_dir", out,
            "--resolution", "16", "--train_batch_size", "2", "--max_sequence_length", "8", "--seed", "0",
            "--report_to", "none", "--checkpointing_steps", "1000", "--max_train_steps", "2",
            "--cache_latents", "--cache_text_embeddings"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=src, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    result = subprocess.run(launch + [wrapper] + argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"run failed ({out}):\n{result.stderr[-4000:]}")
    peaks = [json.load(open(os.path.join(rss_dir, f"rss-{rank}.json")))["peak_rss_kib"] / 1024
             for rank in range(processes)]
    return {"seconds": round(seconds, 1), "peak_rss_mib": [round(p) for p in peaks],
            "reused": "Reusing cache" in result.stderr}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[20000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--distinct", type=int, default=845, help="distinct captions")
    parser.add_argument("--src", default=os.path.join(ROOT, "src"), help="the source tree measured (default: src/)")
    parser.add_argument("--before", default=None, help="another source tree (its src/) to measure too")
    parser.add_argument("--before_max_images", type=int, default=20000,
                        help="largest dataset for --before (its in-memory caches grow with the data)")
    parser.add_argument("--codes", nargs="+", choices=["after", "before"], default=["after", "before"],
                        help="which trees to measure (before: only with --before)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_cache_memory"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    os.makedirs(args.workdir, exist_ok=True)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, os.path.join(ROOT, "src"))
    base = os.path.join(args.workdir, "pipeline")
    if not os.path.isfile(os.path.join(base, "model_index.json")):
        from tiny_pipeline import tiny_mmdit_pipeline

        tiny_mmdit_pipeline(seed=0, layout="sd3", masked=True).save_pretrained(base)

    codes = [(code, args.src if code == "after" else args.before) for code in args.codes
             if code == "after" or args.before]
    rows = []
    for n in args.images:
        data = write_images(os.path.join(args.workdir, f"data-{n}"), n, args.distinct)
        for processes in args.processes:
            for code, src in codes:
                if code == "before" and n > args.before_max_images:
                    continue
                out = tempfile.mkdtemp(dir=args.workdir, prefix=f"out-{code}-{n}-{processes}-")
                row = {"images": n, "processes": processes, "code": code, **run_case(src, base, data, out, processes,
                                                                                       args.workdir)}
                if code == "after":
                    rerun = run_case(src, base, data, out, processes, args.workdir)
                    row.update(rerun_seconds=rerun["seconds"], rerun_peak_rss_mib=rerun["peak_rss_mib"],
                               rerun_reused=rerun["reused"])
                print(json.dumps(row), flush=True)
                rows.append(row)

    print("\n| images | processes | code | peak RSS per process (MiB) | wall (s) | rerun: peak RSS (MiB) "
          "| rerun wall (s) |")
    print("|---:|---:|---|---|---:|---|---:|")
    for r in rows:
        rerun = (f"{' / '.join(map(str, r['rerun_peak_rss_mib']))} (cache reused)" if r.get("rerun_reused")
                 else "-")
        print(f"| {r['images']:,} | {r['processes']} | {r['code']} | {' / '.join(map(str, r['peak_rss_mib']))} | "
              f"{r['seconds']} | {rerun} | {r.get('rerun_seconds', '-')} |")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"\nmachine: {machine}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
