"""Analytic multiply-accumulate counts from a traced program (no compile, no weights).

Counts the MACs of every dot_general and convolution in the jaxpr of a function traced on
abstract inputs. Elementwise work (norms, activations, softmax) is not counted, following the
convention of the papers' "GMACs"/"Gflops" tables (SPEC section 3).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np


def _dot_general_macs(eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    contracted = int(np.prod([lhs_shape[d] for d in lhs_contract]))
    return int(np.prod(eqn.outvars[0].aval.shape)) * contracted


def _conv_macs(eqn) -> int:
    dims = eqn.params["dimension_numbers"]
    rhs_shape = eqn.invars[1].aval.shape
    rhs_spec = dims.rhs_spec  # (out_feature_dim, in_feature_dim, *spatial_dims)
    in_features = rhs_shape[rhs_spec[1]]
    window = int(np.prod([rhs_shape[d] for d in rhs_spec[2:]]))
    return int(np.prod(eqn.outvars[0].aval.shape)) * in_features * window


def _sub_jaxprs(value: Any):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _jaxpr_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_general_macs(eqn)
        elif name == "conv_general_dilated":
            total += _conv_macs(eqn)
        elif name == "cond":
            total += max(_jaxpr_macs(b.jaxpr) for b in eqn.params["branches"])
        else:
            repeat = eqn.params.get("length", 1) if name == "scan" else 1
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    total += repeat * _jaxpr_macs(sub)
    return total


def count_macs(fn: Callable[..., Any], *abstract_args: Any) -> int:
    """Multiply-accumulates of ``fn(*abstract_args)``.

    Args:
      fn: a traceable function.
      *abstract_args: pytrees of jax.ShapeDtypeStruct (or arrays).

    Returns:
      The MAC count (int).
    """
    closed = jax.make_jaxpr(fn)(*abstract_args)
    return _jaxpr_macs(closed.jaxpr)
