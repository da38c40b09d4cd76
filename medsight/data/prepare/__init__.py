"""Index public dataset releases as published into the layout the stages read (no image copies)."""
