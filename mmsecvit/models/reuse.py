"""Values derived from parameters, kept between inference calls."""
import torch


def reuse_without_grad(module, name, compute, *tensors):
    """``compute(*tensors)``; when no gradient is recorded, the result is kept on ``module`` and reused
    while ``tensors`` are the same, unmodified tensors.

    For values derived from parameters (a regrouped or offset weight): at inference they are then
    computed once instead of at every call, which matters on small inputs. Any in-place change (an
    optimizer step, ``load_state_dict``) bumps a tensor's version and any move changes its address,
    either of which recomputes the value. Traced graphs, and inference tensors (which keep no version),
    always compute it. The kept values cost little memory (the regrouped qkv weights of SecViT-S: 28 MB).
    """
    if torch.is_grad_enabled() or torch.jit.is_tracing() or any(t.is_inference() for t in tensors):
        return compute(*tensors)
    key = tuple((t.data_ptr(), t._version, t.dtype, t.shape) for t in tensors)
    cache = module.__dict__.setdefault('_reused_without_grad', {})
    if name not in cache or cache[name][0] != key:
        cache[name] = (key, compute(*tensors))
    return cache[name][1]
