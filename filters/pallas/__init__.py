"""Fused Pallas GPU kernels of the chunked forms (`backend="pallas"`), each beside its plain-JAX reference.

`delta_rule` (the generalized delta rule and the scalar-decay additive recursion, forward and backward),
`gla` (the channel-wise additive recursion), `covariance` (the exact family's covariance pass),
`lowering` (the `Lowering` that `filters.compile` dispatches to), `common` (launch, products, platform
switch). See docs/performance.md for the design and the measurements.
"""
