"""Notifications: Gotify and the router that decides which events notify."""
