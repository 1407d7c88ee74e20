"""Census-guided per-layer mixed precision (issue 13).

    options(base recipe)                 -> the formats each linear may take (base, W8, FP16 / A8, A16)
    sensitivity(model, calib, options)   -> per linear and option: estimated damage + measured bits
    search(sensitivity, budget)          -> one option per linear (multiple-choice knapsack, exact DP)
    to_recipe(base, choice)              -> a Recipe whose `overrides` hold the per-linear formats
    explain(choice, census)              -> why each kept linear was kept, in the census's words
"""
