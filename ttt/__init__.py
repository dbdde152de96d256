"""TTT-E2E engine: end-to-end test-time training for long context (arXiv 2512.23675), in PyTorch.

from ttt import ModelConfig, TTTModel, TTTState
model = TTTModel(ModelConfig.from_name("debug"))
out = model.prefill(tokens)          # token_nll, state, last_logits
loss = model.meta_loss(tokens)       # second-order meta-training objective
"""

from ttt.config import ModelConfig
from ttt.model import TTTModel
from ttt.state import TTTState

__all__ = ["ModelConfig", "TTTModel", "TTTState"]
