"""Names of decoding strategies (torch-free, so pure-logic cores can validate settings)."""

DREAM_ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")
REMASKING = ("low_confidence", "random")
