from .combined_margin_loss import CombinedMarginLoss

__all__ = ['CombinedMarginLoss']
