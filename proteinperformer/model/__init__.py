"""The Performer protein LM as a plain ``nn.Module`` (training concerns live in ``proteinperformer.training.lm``)."""

from proteinperformer.model.calibration import calibrate_features, is_calibrated
from proteinperformer.model.performer import Block, ModelConfig, PerformerLM, convert_attention, is_feature_key

__all__ = ["Block", "ModelConfig", "PerformerLM", "calibrate_features", "convert_attention", "is_calibrated",
           "is_feature_key"]
