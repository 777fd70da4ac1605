"""Conversation sessions: a user's context that follows their requests between holders."""
