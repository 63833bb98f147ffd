"""Every kernel launch of a few decode steps, as the GPU path would make them, recorded on a
CPU-only MLX: to check that a refactoring of the launch code changed no launch.

    python bench/record_launches.py [--tree DIR] [--steps 3] > new.json
    python bench/record_launches.py --tree OLD > old.json; cmp old.json new.json

The model and the stand-ins are `standin_primitives.py`'s (tiny dimensions, Flash's layer
structure, prefilled on the ops path to 4,096 tokens so the CSA layer runs the sparse
indexer); each launch is recorded as [kernel name, template, grid, threadgroup, output
shapes, output dtypes, input shapes and dtypes]. ``--tree`` records another checkout (e.g.
``git archive <commit> dsv4_mlx bench | tar -x -C DIR``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--context", type=int, default=4096)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(a.tree) / "bench"))
    sys.path.insert(0, a.tree)
    import importlib.util

    import mlx.core as mx

    import gpu_decode  # the recorded tree's
    from dsv4_mlx.kernels import dispatch
    from dsv4_mlx.kernels import indexer as ki

    # the stand-ins from this checkout's bench/ (an older tree's may not have `prefilled`)
    spec = importlib.util.spec_from_file_location(
        "standin_here", Path(__file__).resolve().parent / "standin_primitives.py")
    sp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sp)
    model, args, tokens, cache = sp.prefilled(gpu_decode, 4, 8, a.context, a.steps)
    sp.install()
    log = []

    def recorder(backend, ks):
        def kern(inputs, template, grid, threadgroup, output_shapes, output_dtypes, **kw):
            log.append([ks.name, [(n, str(v)) for n, v in template], list(grid),
                        list(threadgroup), [list(s) for s in output_shapes],
                        [str(d) for d in output_dtypes],
                        [[list(x.shape), str(x.dtype)] for x in inputs]])
            return sp.standin(list(zip(output_shapes, output_dtypes)), inputs)
        return kern

    dispatch.build_kernel = recorder
    ki._kernel = recorder
    for t in range(a.steps):
        mx.eval(model(mx.array([[tokens[a.context + t]]]), cache=cache),
                [c.state for c in cache])
    print(json.dumps(log, indent=0))


if __name__ == "__main__":
    main()
