"""How concepts are erased beyond MACE's reference: the constrained fusion, SepME's separable
increments, All-but-One's alternative objective, RealEra's neighbour mining, and the fusion that
combines them."""
