"""What EK-FAC declares to its scorer: parameters, documentation, fitted attributes."""

from __future__ import annotations

from numbers import Integral

import torch
from sklearn.utils._param_validation import Interval, StrOptions

from .._base import Attribute, Param
from ._fisher import FISHERS

#: The precisions ``kronecker_dtype`` accepts, by name.
KRONECKER_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

PARAMETERS = (
        "estimator", "loss", "params", "regularization",
        Param("update_diagonal", True, ["boolean"], "bool", """Refit the eigenvalues in the Kronecker eigenbasis from per-sample gradients
(EK-FAC). False keeps the products of the factors' eigenvalues (K-FAC)."""),
        Param("basis_iter", "auto", [StrOptions({"auto"}), Interval(Integral, 0, None, closed="left")],
              '"auto" or int', """With ``update_diagonal=True``: alternating updates that move each layer's
two factors towards the nearest Kronecker product (in Frobenius norm) of its
curvature block before their eigenbasis is taken. K-FAC's factors treat
activations and output gradients as independent; each update reweights one
factor's covariance by the other's quadratic form, which corrects for their
dependence and gives a basis in which the refitted diagonal is closer to the
curvature. Each update costs two passes over the layer data (activations and
output gradients), kept in memory from the first pass while they fit in
2**25 numbers (134 MB in float32), recomputed otherwise. 0
keeps the eigenbasis of the K-FAC factors (George et al., 2018, and pyDVL).
"auto" (the default) takes 2 when the layer data fits that cache and 0 when it
does not (the updates would then cost full passes over the data and, measured,
gain little; see Notes); the value used is ``basis_iter_``."""),
        Param("fisher", "auto", [StrOptions({"auto", *FISHERS})], '{"auto", "gauss-newton", "true", "empirical"}',
              """Output gradients the factors are built from. "gauss-newton": the expectation
over the model's predictive distribution, computed exactly from a square root
of the loss's Hessian with respect to the model output (one backward pass per
output, e.g. per class; any twice-differentiable loss); the factors are then
those of the Gauss-Newton matrix, and equal it whenever it is
Kronecker-factored (a single linear layer with MSE loss). "true": one label per
sample drawn from the predictive distribution (softmax for cross-entropy and
skorch's NLL on probabilities, Bernoulli for binary cross-entropy, Gaussian for
MSE), seeded by ``random_state``: an unbiased, noisier estimate at the cost of
one backward pass, for models with many outputs. "empirical": the given
labels. "auto" (the default): "gauss-newton" while its layer data (one column
of output gradients per output) fits the cache of ``basis_iter``, "true" beyond,
where the exact expectation would cost one pass over the data per output and
the sampling noise averages out over many samples (see Notes); the value used
is ``fisher_``."""),
        Param("layers", None, [None, str, list, tuple], "str or list of str", """Names of the ``nn.Linear`` / ``nn.Conv2d`` modules to take into account, as in
``model.named_modules()``; the parameters of other modules are held fixed.
None takes every module holding a selected parameter, and raises an error
listing any that is neither Linear nor Conv2d; the affine parameters of BatchNorm
layers are held fixed (see Notes)."""),
        Param("kronecker_dtype", None, [None, StrOptions(set(KRONECKER_DTYPES))],
              '{None, "float32", "float64", "bfloat16"}',
              """Precision of the products over activations and output gradients: each
batch's contribution to the Kronecker factors, the projections on their
eigenbases (in the eigenvalue correction and in the influences) and the
contractions with the test factors. The eigendecompositions, the running sums
over batches and the eigenvalues stay float64, the gradients come from autograd
in ``dtype``, and results are returned in ``dtype``; None uses ``dtype``.
"bfloat16" (8 significant bits) halves the memory of the activations and output
gradients kept between the passes of fit (twice as many are kept) and of each
batch's projections, and is faster where matrix units compute in bfloat16 (GPUs,
recent x86 CPUs). Measured on one CPU thread that has them
(``benchmarks/results/precision.md``, two MLPs and two CNNs): influences within a
relative Frobenius error of 2.3e-3 to 3.6e-3 of float64 (float32: 1e-6 to 4e-6),
a Pearson of 1 - 7e-6 or closer, their Pearson with the exact influences moved
by 5e-4 at most; 1.3x faster than float32 on a 26,122-parameter MLP,
2.7x on a CNN whose activations fit the cache only in bfloat16, 13% slower on a
3,466-parameter MLP. "float32" with ``dtype="float64"`` keeps float64 gradients
and runs these products in float32 (within 3e-7 of float64)."""),
        "mode", "batch_size", "dtype", "device", "progress",
        Param("random_state", None, ["random_state"], "int, RandomState instance or None",
              'Seeds the labels sampled for ``fisher="true"`` (and "auto" when it samples).'),
)
SCORER_NAME = "EkfacInfluenceScorer"
SUMMARY = "Influence functions with EK-FAC, Kronecker-factored curvature per layer."
DESCRIPTION = """
    The curvature is block diagonal over the model's ``nn.Linear`` and ``nn.Conv2d``
    layers. Each block is approximated by the Kronecker product of the covariance of
    the layer's input activations (a 1 appended for the bias) and that of the
    gradients with respect to its output (K-FAC; KFC for convolutions, over unfolded
    patches); with ``update_diagonal=True`` its eigenvalues are refitted from
    per-sample gradients projected on the Kronecker eigenbasis (EK-FAC, George et al.
    2018), after the factors have been moved towards the nearest Kronecker product of
    the block (``basis_iter``), which gives a better basis. ``regularization`` is
    added to those eigenvalues, as in pyDVL's ``EkfacInfluence``, together with the
    diagonal of the estimator's own L2 penalty in the same basis. The factors take
    ``2 + 2 * basis_iter`` passes over the training data (all but the first over
    activations kept in memory when they fit), each with one backward pass per
    output column of the Fisher, and influences need no Hessian-vector
    products."""
CURVATURE_NOTE = """Here H is the EK-FAC approximation of the Gauss-Newton (Fisher)
    matrix, block diagonal over layers; on a non-convex model it differs from the
    Hessian that :class:`DirectInfluenceScorer` uses by default."""
NOTES = """
    Convolutions follow KFC (Grosse & Martens, 2016): the activation factor is
    averaged over output positions and the gradient factor summed over them, so
    that plain K-FAC has the scale of the Fisher when output gradients are
    spatially uncorrelated.

    BatchNorm: the layers are evaluated in eval mode, with their running statistics,
    so they are fixed affine maps between the convolutions and the output gradients
    flow through them. Their own affine parameters (weight and bias), which are not
    Kronecker-factored, are held fixed: they are left out of ``n_params_`` and listed
    in ``fixed_params_``. That agrees better with the exact influences than adding
    them as a diagonal block (the diagonal of the Gauss-Newton matrix over them).
    Measured as the Pearson correlation over the influence matrix against conjugate
    gradients solved to ``rtol=1e-10`` in float64 over all trainable parameters
    BatchNorm included, on ``skinfluence.datasets.SmallResNet(width=4)`` with its
    stem and first block frozen (962 trainable parameters, 48 of them BatchNorm),
    64 training images 3x16x16: held fixed 0.930 and 0.951, with a diagonal block
    0.897 and 0.931 (regularization 0.01 and 0.1); with 1,000 and 2,000
    training images of 32x32 (``benchmarks/results/cnn.md``), held fixed 0.978 and
    0.781, with the block 0.968 and 0.686. Their share of
    the influences is small: conjugate gradients without them correlates 0.994 to
    0.999 with conjugate gradients with them. To take them into account exactly, use
    another method.

    The defaults ``fisher="auto"`` and ``basis_iter="auto"`` spend passes over the
    data only where they pay. While the layer data of the exact Gauss-Newton
    factors fits the cache, they are used with two refinement updates: on the
    digits MLP of ``benchmarks/results/ekfac.md`` (3,466 parameters, 1,000
    points) the Pearson against the exact influences is 0.981 against 0.954 for
    the sampled Fisher, and 10x faster than pyDVL's EK-FAC; on
    ``SmallResNet(width=4)`` (2 classes, ``benchmarks/results/ekfac_cnn.md``) 9.1x
    faster than kronfluence 1.0.1 at Pearson 0.781 against 0.727. Beyond the
    cache each refinement and each output column costs a full pass, and the
    sampled Fisher is taken: on a 9,930-parameter CNN on digits (10 classes, 2,000
    images, ``benchmarks/results/ekfac_cnn.md``) the default takes 1.15 s at
    Pearson 0.702 against the exact factors with refinement's 5.19 s at 0.687
    (kronfluence: 3.58 s, 0.697); on a 405,610-parameter MLP with 16,000 points
    and 10 classes (``benchmarks/results/scale.md``) 2.8 s against 22.9 s, at a
    Pearson against conjugate gradients of 0.928 against 0.933 (pyDVL's EK-FAC:
    2.5 s, 0.943). The sampled Fisher is seeded by ``random_state``; set it for
    reproducible factors."""
MEMORY = """
    Memory: per layer, the two factors and their eigenvectors plus ``d_out x d_in``
    eigenvalues; while computing influences, the test points' preconditioned
    gradients (n_test x p). Training gradients of a layer applied once per sample
    are never formed: the test factors are contracted with the batch's activations
    and output gradients; convolutions form ``batch_size`` gradients at a time."""
ATTRIBUTES = (
        Attribute("layers_", "list of str", "Names of the modules whose parameters are taken into account.",
                  source="layer_names_"),
        Attribute("fixed_params_", "list of str", """Selected parameters held fixed: the affine parameters of BatchNorm layers
(see Notes)."""),
        Attribute("fisher_", "str", 'The Fisher the factors were built from ("auto" resolved).'),
        Attribute("basis_iter_", "int", 'The refinement updates taken ("auto" resolved).'),
)
EXAMPLES = """
    >>> import numpy as np
    >>> import torch
    >>> from sklearn.datasets import load_digits
    >>> from skorch import NeuralNetClassifier
    >>> from skinfluence import EkfacInfluenceScorer
    >>> X, y = load_digits(return_X_y=True)
    >>> X, y = (X / 16).astype(np.float32), y.astype(np.int64)
    >>> _ = torch.manual_seed(0)
    >>> module = torch.nn.Sequential(
    ...     torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    >>> net = NeuralNetClassifier(
    ...     module, criterion=torch.nn.CrossEntropyLoss, max_epochs=20, lr=0.1,
    ...     train_split=None, verbose=0).fit(X[:300], y[:300])
    >>> scorer = EkfacInfluenceScorer(net, regularization=0.1)
    >>> scorer = scorer.fit(X[:300], y[:300])
    >>> scorer.influences(X[300:310], y[300:310]).shape
    (10, 300)
    >>> by_layer = scorer.influences_by_layer(X[300:310], y[300:310])
    >>> sorted(by_layer)
    ['0', '2']
    >>> bool(np.allclose(sum(by_layer.values()), scorer.influences(X[300:310], y[300:310]),
    ...                  rtol=1e-4, atol=1e-6))
    True"""

