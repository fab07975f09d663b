"""Proactive forecast: robust temperature and dew-point trends per rack position, minutes to each limit."""
