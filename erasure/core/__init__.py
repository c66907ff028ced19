"""The mathematics every method shares: text states, cross-attention projections, the closed forms
of MACE's refinement and fusion, prompt templates. Depends on torch alone."""
