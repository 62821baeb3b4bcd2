"""The cluster side: presets, planning, submission and rank bootstrap. No torch at module scope."""
