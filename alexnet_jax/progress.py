"""How long commands report their progress: durations and ETAs as H:MM:SS."""


def format_duration(seconds: float) -> str:
  """H:MM:SS, for the ETAs and durations that long commands log (training, preparation)."""
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'
