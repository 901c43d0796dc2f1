"""nit_model: a thin NiT model package on top of nit_kernels (config, model, training, sampling,
evaluation, the `nit` command). Heavy submodules load on first use: ``nit_model.sample`` is
`nit_model.sampling.sample`."""

__all__ = ["sample"]


def __getattr__(name):
    if name == "sample":
        from .sampling import sample
        return sample
    raise AttributeError(f"module 'nit_model' has no attribute {name!r}")
