"""What both halves of wallbreak really share."""
