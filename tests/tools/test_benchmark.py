"""tools/analysis_tools/benchmark.py: the timing child (models in turns, in one process) and the report's ratios."""
import json

from helpers import load_tool


def load_benchmark():
    return load_tool('analysis_tools/benchmark')


def test_timing_child_times_every_model_in_one_process(capsys):
    benchmark = load_benchmark()
    args = benchmark.parse_args(['--child', 'secvit_t,swin_t', '64x64', '--repeats', '2', '--threads', '1',
                                 '--device', 'cpu', '--measure', 'time', '--forward-only', 'swin_t'])
    benchmark.measure(args)
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(results) == {'secvit_t', 'swin_t'}
    assert results['secvit_t']['fwd_bwd_s'] > 0 and results['secvit_t']['fwd_s'] > 0
    assert 'fwd_bwd_s' not in results['swin_t'] and results['swin_t']['fwd_s'] > 0  # forward only, as asked


def test_timing_child_runs_batches_under_autocast(capsys):
    benchmark = load_benchmark()
    args = benchmark.parse_args(['--child', 'secvit_t', '64x64', '--repeats', '1', '--threads', '1', '--device',
                                 'cpu', '--measure', 'time', '--batch', '2', '--dtype', 'bfloat16'])
    benchmark.measure(args)
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results['secvit_t']['output_dtype'] == 'bfloat16'
    assert results['secvit_t']['fwd_bwd_s'] > 0


def test_report_gives_ratios_against_swin_and_scaling():
    benchmark = load_benchmark()
    results = {
        ('secvit_s', '800x1344'): dict(fwd_s=1.0, fwd_bwd_s=3.0, peak_mib=90.0),
        ('swin_t', '800x1344'): dict(fwd_s=2.0, fwd_bwd_s=3.0, peak_mib=100.0),
        ('secvit_s', '1600x2688'): dict(fwd_s=4.0, fwd_bwd_s=12.6),
        ('swin_t', '1600x2688'): dict(fwd_s=8.8, fwd_bwd_s=12.0),
    }
    text = benchmark.report(results, ['secvit_s', 'swin_t'], ['800x1344', '1600x2688'])
    assert '| secvit_s | 800x1344 | 0.50 | 1.00 | 0.90 |' in text
    assert '| secvit_s | 1600x2688 | 0.45 | 1.05 | - |' in text
    assert '| secvit_s | 4.00 | 4.20 |' in text
    assert '| swin_t | 4.40 | 4.00 |' in text


def test_header_names_the_cpu_and_the_instruction_sets_in_use():
    benchmark = load_benchmark()
    line = benchmark.describe_machine()
    assert line.startswith(f'CPU {benchmark.cpu_name()}; PyTorch ')
    from mmsecvit.ops import dispatch
    assert f'mmsecvit kernels {dispatch.kernel_isa()}' in line
