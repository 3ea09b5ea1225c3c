package api

import (
	"errors"
	"log/slog"
	"net/http"

	"github.com/labstack/echo/v4"
)

// Error is the one JSON error format of the HTTP API:
// {"error": {"code": "...", "message": "..."}}. Messages say what was wrong
// with the request and never reveal internals.
type Error struct {
	Status  int    `json:"-"`
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return e.Code + ": " + e.Message }

func badRequest(code, msg string) *Error {
	return &Error{Status: http.StatusBadRequest, Code: code, Message: msg}
}

// ErrorHandler renders every error, ours and echo's (unknown route, body too
// large, method not allowed), in the one JSON format. Anything unexpected is
// logged and answered with a bare 500.
func ErrorHandler(log *slog.Logger) echo.HTTPErrorHandler {
	return func(err error, c echo.Context) {
		if c.Response().Committed {
			return
		}
		var e *Error
		var he *echo.HTTPError
		switch {
		case errors.As(err, &e):
		case errors.As(err, &he):
			e = &Error{Status: he.Code, Code: codeFor(he.Code), Message: http.StatusText(he.Code)}
			if he.Code == http.StatusRequestEntityTooLarge {
				e.Message = "request body too large"
			}
		default:
			log.Error("request failed", "method", c.Request().Method, "path", c.Path(), "err", err)
			e = &Error{Status: http.StatusInternalServerError, Code: "internal", Message: "internal error"}
		}
		if e.Status >= 500 && he != nil {
			log.Error("request failed", "method", c.Request().Method, "path", c.Path(), "err", err)
		}
		if err := c.JSON(e.Status, map[string]*Error{"error": e}); err != nil {
			log.Debug("writing error response", "err", err)
		}
	}
}

func codeFor(status int) string {
	switch status {
	case http.StatusNotFound:
		return "not_found"
	case http.StatusMethodNotAllowed:
		return "method_not_allowed"
	case http.StatusRequestEntityTooLarge:
		return "body_too_large"
	case http.StatusUnsupportedMediaType:
		return "unsupported_media_type"
	case http.StatusServiceUnavailable:
		return "unavailable"
	}
	if status >= 500 {
		return "internal"
	}
	return "bad_request"
}
