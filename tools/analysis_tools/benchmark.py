"""Backbone speed and memory: SecViT against mmdet's Swin Transformer, same process settings for both.

For every model and input size it prints the median forward time (eval, no grad), the median
forward + backward time (train mode, loss = sum of output means) and the peak memory of forward +
backward, then the SecViT/Swin ratios and how time scales from 800x1344 to 1600x2688.

Times: all models of one size are timed in one process, taking turns run by run (SecViT, Swin, SecViT,
Swin, ...), so a change in the machine's speed while it measures reaches all of them alike; ``--rounds``
repeats that in new processes.

    # CPU, all models and sizes (~20 min on 2 cores)
    python tools/analysis_tools/benchmark.py
    python tools/analysis_tools/benchmark.py --models secvit_s swin_t --sizes 800x1344 --repeats 5 --rounds 3

On the CPU, the peak memory of each model is measured in a process of its own in which glibc hands
every freed block of 64 KiB or more back to the kernel (``MALLOC_MMAP_THRESHOLD_=65536``), so the
resident-set high-water mark above the level before the first forward + backward is the peak of live
tensors. On a GPU it is ``torch.cuda.max_memory_allocated`` above the level before.

``--allocator tuned`` (the default on the CPU) starts the timing processes with glibc told to
keep freed memory (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``): by default glibc returns
every large tensor to the kernel when it is freed and the next one pays page faults for fresh zeroed
pages, which on a 2-core machine costs a third of a training step for either model.
``--allocator default`` times without it.

``--kernels`` picks mmsecvit's compiled CPU kernels (``auto``: the best build for this CPU; ``avx2``;
``off``: PyTorch paths only), as ``MMSECVIT_KERNELS`` does. To approximate a CPU without AVX-512 on one that
has it, lower PyTorch's own dispatch too: ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2 python tools/analysis_tools/benchmark.py``. The first line of the output names the CPU, the
instruction set PyTorch uses and the kernels' build.
"""
import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SIZES = ('224x224', '512x512', '800x1344', '1600x2688')
MODELS = ('secvit_t', 'secvit_s', 'swin_t', 'swin_s')
KNOWN_MODELS = ('secvit_t', 'secvit_s', 'secvit_b', 'secvit_l', 'swin_t', 'swin_s')
SWIN_SETTINGS = {'swin_t': dict(depths=(2, 2, 6, 2)), 'swin_s': dict(depths=(2, 2, 18, 2))}
TUNED_MALLOC = {'MALLOC_MMAP_THRESHOLD_': str(2 ** 32), 'MALLOC_TRIM_THRESHOLD_': str(2 ** 36)}
AUTOCAST_DTYPES = {'float32': None, 'bfloat16': 'bfloat16', 'float16': 'float16'}
RETURNING_MALLOC = {'MALLOC_MMAP_THRESHOLD_': str(2 ** 16)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(MODELS),
                        help=f'secvit_{{t,s,b,l}} and swin_{{t,s}}; default {" ".join(MODELS)}')
    parser.add_argument('--sizes', nargs='+', default=list(SIZES), help='HxW input sizes')
    parser.add_argument('--repeats', type=int, default=0, help='timed runs (default: 5 below 800x1344, else 3)')
    parser.add_argument('--rounds', type=int, default=1,
                        help='time the models this many times, each time in a new process, and report the '
                             'median over rounds')
    parser.add_argument('--threads', type=int, default=os.cpu_count(), help='torch CPU threads')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    parser.add_argument('--cluster-size', type=int, default=98, help='SecViT tokens per cluster')
    parser.add_argument('--batch', type=int, default=1, help='images per batch')
    parser.add_argument('--dtype', choices=sorted(AUTOCAST_DTYPES), default='float32',
                        help='float32, or autocast to bfloat16 / float16 (the parameters stay float32)')
    parser.add_argument('--no-backward', action='store_true', help='forward only')
    parser.add_argument('--allocator', choices=['tuned', 'default'], default='tuned',
                        help='glibc malloc settings of the measuring processes on the CPU (see above)')
    parser.add_argument('--kernels', choices=['auto', 'avx512', 'avx2', 'off'], default='auto',
                        help="mmsecvit's compiled CPU kernels: the best build, a given one, or off (see above)")
    parser.add_argument('--json', help='also write the results to this file')
    parser.add_argument('--child', nargs=2, metavar=('MODELS', 'SIZE'), help=argparse.SUPPRESS)
    parser.add_argument('--forward-only', default='', help=argparse.SUPPRESS)
    parser.add_argument('--measure', choices=['all', 'time', 'memory'], default='all', help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def parse_size(text):
    try:
        height, width = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise SystemExit(f'Size {text!r} is not of the form HxW, e.g. 800x1344') from None
    return height, width


def build_model(name, cluster_size):
    if name.startswith('secvit_'):
        from mmsecvit import SecViT
        return SecViT(name.split('_')[1], cluster_size=cluster_size)
    from mmdet.models.backbones import SwinTransformer
    return SwinTransformer(**SWIN_SETTINGS[name])


def resident_mib():
    with open('/proc/self/statm') as statm:
        return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def measure(args):
    """Runs in the child process: peak memory and/or times of the comma-separated models at one size (times
    taken in turns, run by run); prints one JSON line {model: results}."""
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names, size = args.child[0].split(','), args.child[1]
    forward_only = set(filter(None, args.forward_only.split(',')))
    height, width = parse_size(size)
    device = torch.device(args.device)
    models = {name: build_model(name, args.cluster_size).to(device) for name in names}
    x = torch.randn(args.batch, 3, height, width, device=device)
    autocast_dtype = AUTOCAST_DTYPES[args.dtype]
    autocast = functools.partial(torch.autocast, device.type, getattr(torch, autocast_dtype or 'float32'),
                                 enabled=autocast_dtype is not None)
    repeats = args.repeats or (5 if height * width < 800 * 1344 else 3)
    results = {name: {} for name in names}

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    def train_step(model):
        with autocast():
            outs = model(x)
        sum(o.float().mean() for o in outs).backward()
        model.zero_grad(set_to_none=True)

    def in_turns(steps, key):
        """Warm every step up, then time them in turns; the median of each one's runs goes under ``key``."""
        for step in steps.values():
            step()
        times = {name: [] for name in steps}
        for _ in range(repeats):
            for name, step in steps.items():
                sync()
                start = time.perf_counter()
                step()
                sync()
                times[name].append(time.perf_counter() - start)
        for name, values in times.items():
            results[name][key] = statistics.median(values)

    backward = [name for name in names if name not in forward_only]
    if args.measure in ('all', 'memory'):
        for name in backward:
            models[name].train()
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                train_step(models[name])
                results[name]['peak_mib'] = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
            else:
                before = resident_mib()
                train_step(models[name])
                results[name]['peak_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    if args.measure in ('all', 'time'):
        for name in backward:
            models[name].train()
        in_turns({name: functools.partial(train_step, models[name]) for name in backward}, 'fwd_bwd_s')
        for model in models.values():
            model.eval()
        with torch.no_grad(), autocast():
            in_turns({name: functools.partial(model, x) for name, model in models.items()}, 'fwd_s')
            for name, model in models.items():
                results[name]['output_dtype'] = str(model(x)[-1].dtype).replace('torch.', '')
    print(json.dumps(results))


def available_mib():
    with open('/proc/meminfo') as meminfo:
        fields = dict(line.split(':', 1) for line in meminfo)
    return int(fields['MemAvailable'].split()[0]) / 1024


def run_child(args, models, size, forward_only, measure, malloc=None):
    command = [sys.executable, __file__, '--child', ','.join(models), size, '--threads', str(args.threads),
               '--device', args.device, '--cluster-size', str(args.cluster_size), '--repeats', str(args.repeats),
               '--batch', str(args.batch), '--dtype', args.dtype,
               '--measure', measure, '--forward-only', ','.join(forward_only)]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(malloc or {})})
    if proc.returncode != 0:
        raise RuntimeError(f'{",".join(models)} at {size} failed:\n{proc.stderr[-2000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_size(args, size, models, forward_only):
    """Peak memory of each model, then ``args.rounds`` timings of all models in turns; times are medians
    over rounds.

    On the CPU each model's memory is measured in a process of its own with glibc returning freed blocks,
    and the models are timed together with the chosen allocator; on a GPU one process per round measures
    both.
    """
    results = {model: dict(model=model, size=size, device=args.device, threads=args.threads, batch=args.batch,
                           dtype=args.dtype) for model in models}
    timing_malloc = None
    if args.device == 'cpu':
        for model in models:
            if model not in forward_only:
                results[model].update(run_child(args, [model], size, [], 'memory', RETURNING_MALLOC)[model])
        timing_malloc = TUNED_MALLOC if args.allocator == 'tuned' else None
    measure = 'time' if args.device == 'cpu' else 'all'
    rounds = [run_child(args, models, size, forward_only, measure, timing_malloc) for _ in range(args.rounds)]
    for model in models:
        for key in ('fwd_s', 'fwd_bwd_s', 'peak_mib'):
            values = [r[model][key] for r in rounds if key in r[model]]
            if values:
                results[model][key] = statistics.median(values)
    return results


def fmt(value, digits=3):
    return '-' if value is None else f'{value:.{digits}f}'


def report(results, models, sizes):
    """Markdown tables: absolute numbers, SecViT/Swin-T ratios, and 1600x2688 over 800x1344 scaling."""
    lines = ['| model | size | forward (s) | forward+backward (s) | peak fwd+bwd memory (MiB) |',
             '|---|---|---|---|---|']
    for model in models:
        for size in sizes:
            r = results.get((model, size))
            if r:
                lines.append(f"| {model} | {size} | {fmt(r.get('fwd_s'))} | {fmt(r.get('fwd_bwd_s'))} | "
                             f"{fmt(r.get('peak_mib'), 0)} |")
    for reference in ('swin_t', 'swin_s'):
        if reference not in models:
            continue
        lines += ['', f'Ratios SecViT / {reference} (<= 1.0: SecViT no slower / no larger)', '',
                  '| model | size | forward | forward+backward | peak memory |', '|---|---|---|---|---|']
        for model in (m for m in models if m.startswith('secvit')):
            for size in sizes:
                ours, theirs = results.get((model, size)), results.get((reference, size))
                if not ours or not theirs:
                    continue
                ratio = [ours.get(k) / theirs[k] if ours.get(k) and theirs.get(k) else None
                         for k in ('fwd_s', 'fwd_bwd_s', 'peak_mib')]
                lines.append(f'| {model} | {size} | ' + ' | '.join(fmt(v, 2) for v in ratio) + ' |')
    if '800x1344' in sizes and '1600x2688' in sizes:
        lines += ['', 'Scaling: time at 1600x2688 / time at 800x1344 (4x the pixels; linear = 4.0)', '',
                  '| model | forward | forward+backward |', '|---|---|---|']
        for model in models:
            small, large = results.get((model, '800x1344')), results.get((model, '1600x2688'))
            if small and large:
                ratio = [large[k] / small[k] if large.get(k) and small.get(k) else None
                         for k in ('fwd_s', 'fwd_bwd_s')]
                lines.append(f'| {model} | ' + ' | '.join(fmt(v, 2) for v in ratio) + ' |')
    return '\n'.join(lines)


def cpu_name():
    with open('/proc/cpuinfo') as cpuinfo:
        return next((line.split(':', 1)[1].strip() for line in cpuinfo if line.startswith('model name')), 'unknown')


def describe_machine():
    """CPU, PyTorch's instruction set, mmsecvit's kernel build, and the ISA limits set in the environment."""
    import torch

    from mmsecvit.ops import dispatch
    limits = ' '.join(f'{key}={os.environ[key]}' for key in ('ATEN_CPU_CAPABILITY', 'ONEDNN_MAX_CPU_ISA',
                                                             'MKL_ENABLE_INSTRUCTIONS') if key in os.environ)
    return (f'CPU {cpu_name()}; PyTorch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}; '
            f'mmsecvit kernels {dispatch.kernel_isa() or "off (" + dispatch.kernel_unavailable_reason() + ")"}'
            + (f'; {limits}' if limits else ''))


def main(argv=None):
    args = parse_args(argv)
    os.environ['MMSECVIT_KERNELS'] = {'auto': '1', 'off': '0'}.get(args.kernels, args.kernels)  # children too
    if args.device == 'auto':
        import torch
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.child:
        return measure(args)
    sizes = sorted(args.sizes, key=lambda s: parse_size(s)[0] * parse_size(s)[1])
    unknown = sorted(set(args.models) - set(KNOWN_MODELS))
    if unknown:
        raise SystemExit(f'Unknown models {unknown}; choose from {" ".join(KNOWN_MODELS)}')
    print(describe_machine(), flush=True)
    print(f'device {args.device}, {args.threads} threads, allocator {args.allocator}, '
          f'SecViT cluster_size {args.cluster_size}, batch {args.batch}, {args.dtype}', flush=True)
    results = {}
    for size in sizes:
        forward_only = [] if not args.no_backward else list(args.models)
        for model in args.models:
            previous = results.get((model, '800x1344'))
            if (size == '1600x2688' and not args.no_backward and previous and 'peak_mib' in previous
                    and args.device == 'cpu'):
                needed = 4.5 * previous['peak_mib']
                if needed > 0.9 * available_mib():
                    print(f'{model} {size}: forward+backward skipped, needs about {needed:.0f} MiB', flush=True)
                    forward_only.append(model)
        for model, result in measure_size(args, size, args.models, forward_only).items():
            results[(model, size)] = result
            print(f"{model:9s} {size:>9s}  forward {fmt(result['fwd_s'])} s  forward+backward "
                  f"{fmt(result.get('fwd_bwd_s'))} s  peak {fmt(result.get('peak_mib'), 0)} MiB", flush=True)
    print()
    print(report(results, args.models, sizes))
    if args.json:
        with open(args.json, 'w') as out:
            json.dump(list(results.values()), out, indent=1)


if __name__ == '__main__':
    main()
