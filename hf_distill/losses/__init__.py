"""Pure tensor loss functions. Nothing here knows about models or the Trainer."""
