"""The error a request gets: an HTTP status and OpenAI's error body."""

from __future__ import annotations

from typing import Optional


class ApiError(Exception):
  """A request the server refuses; becomes an OpenAI-style JSON error with `status`."""

  def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error",
               param: Optional[str] = None):
    super().__init__(message)
    self.status, self.message, self.code, self.type, self.param = status, message, code, type_, param

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}
