"""ckf-dist: distributed Collaborative Knowledge Fusion (CKF) for LLM-based multi-task recommendation.

Data flow: data (readers, splits, prompts, Ray streaming) -> cf (MF/LightGCN, CKEM) -> model (MetaNet,
fusion, Multi-LoRA; KFM + MTM) -> train (DeepSpeed ZeRO-3 loop) -> eval (metrics, baselines, reports).
"""

__version__ = "0.1.0"
