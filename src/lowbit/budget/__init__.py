"""Budgeted allocation across layers: which bit width and group size (or, for a GGUF file, which
llama.cpp block type) each linear layer gets so that the model meets a size budget (average bits
per weight, or total bytes) with the least loss.

1. Cost of every (layer, level): exact stored bytes (qtensor.format_nbytes; for a block type,
   rows * cols / block * type_size, the bytes the file holds).
2. Sensitivity of every (layer, level), Q-BERT style but measured: the layer's output error
   tr(D H D^T) for the round-to-nearest error D at that level, H from one calibration pass.
3. Greedy allocations: from a floor (the smallest level everywhere, or one uniform level that
   fits), repeatedly take the upgrade with the best error reduction per byte (lower convex hull
   per layer) while it fits the budget.
4. Start of the search: several allocations are scored by the KL divergence of the whole
   model's next-token distribution (layers fake-quantized at their levels) to the unquantized
   model on held-out calibration windows, and the best is the start: the greedy from the smallest
   level; each uniform level that fits, topped up greedily; both again on errors rescaled into
   model KL by a probe (one forward pass per layer with that layer alone quantized); and each
   uniform level that alone meets the budget. The output error of step 2 ranks one layer's levels
   but does not say what a layer's error costs at the model's output: on smollm2-135m at the size
   of w3g128 (RTN) the plain greedy scored KL 2.37, uniform w3g128 1.58, and the probed greedy
   from w2g64 1.16. With the uniform levels among the starts the search never ends worse than a
   uniform level that fits, on the windows it is scored on.
5. Evolutionary search (EvoPress style): offspring of the current allocation switch levels in a
   few layers (one up, one down, keeping the budget), scored by the same KL; the best offspring
   replaces the parent when it is better.
6. Confirmation: a few thousand tokens can be fitted (on smollm2-135m, RTN at the size of
   w3g128, a search that cut the searched windows' KL by 12% raised WikiText-2's by 9%), so the
   search's result is kept only if it also beats its start on four times as many windows it never
   saw, by more than two standard errors of the paired per-window difference. (When no offspring
   beat the start, the start is the result and nothing needs confirming.)

When no layer can move up a level from the smallest allocation within the budget (a budget at
the size of the smallest level, say), that allocation is the only one: steps 2-6 are skipped and
the report says so.

The result is a list of per-layer rules (recipes.Rule) the normal pipeline then quantizes with
(GPTQ, AWQ...), and a report of what was chosen and why. Over block types (plan_block_budget,
for to_gguf.py) the same steps run with each layer rounded by ggml_rtn on the type, and the
result is each layer's type; a type whose block does not divide a layer's rows is offered to that
layer as the 32-weight type llama.cpp stores such rows in (costs.stored_level).

Where each step lives: costs.py (1, and the budget in bytes), rounding.py (how a layer is rounded
at a level while measuring and scoring), sensitivity.py (2, and the probe's rescaling), search.py
(3-5), scorer.py (the KL scorer, the fake-quantized model, the probe's block replay, the
confirmation test), plan.py (plan_budget / plan_block_budget: all of it in order, and the
BudgetReport).
"""
