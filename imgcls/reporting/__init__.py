"""What runs produce for people: metrics, figures, training history."""
