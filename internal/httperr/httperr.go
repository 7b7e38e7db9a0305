// Package httperr is how wsp answers a request it could not relay: a status
// the user can act on, a one-line plain-text body saying what happened and
// where, and header X-Wsp-Error with a stable code.
package httperr

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
)

// Header carries the machine-readable code of a wsp failure.
const Header = "X-Wsp-Error"

// Codes, one per distinct cause an operator would act on differently.
const (
	BadRequest         = "bad_request"         // 400: malformed request
	BadDestination     = "bad_destination"     // 400: missing or unparsable destination
	ServerRefused      = "server_refused"      // 403: a server rule refused it
	ClientRefused      = "client_refused"      // 403: the client's rules refused it
	DialFailed         = "dial_failed"         // 502: the client could not reach the destination
	DestinationBroken  = "destination_broken"  // 502: the destination broke the exchange
	TunnelBroken       = "tunnel_broken"       // 502: the client session broke
	NoClient           = "no_client"           // 503: nobody connected can serve it
	ClientBusy         = "client_busy"         // 504: connected clients stayed at their stream limit
	DestinationTimeout = "destination_timeout" // 504: the destination did not answer in time
	Unauthorized       = "unauthorized"        // 401: a credential is missing
	Forbidden          = "forbidden"           // 403: a credential is wrong
	Draining           = "draining"            // 503: the server is shutting down
	SessionLimit       = "session_limit"       // 503: too many client sessions
	BodyTooLarge       = "body_too_large"      // 413: the request body exceeds maxbodybytes
	ClientError        = "client_error"        // 502: a legacy client reported a failure (its status 527)
	NodeUnreachable    = "node_unreachable"    // 503: no server node holding the client could be reached; 504: one took the request and did not answer in time
	AppGone            = "app_gone"            // StatusAppGone: the app went away; never sent, for logs and metrics
)

// StatusAppGone is the status logged for a request whose app went away
// before its answer (nginx's 499); no answer is sent.
const StatusAppGone = 499

// RetryAfter is the Retry-After value sent with 503s, in seconds.
const RetryAfter = 1

// Error is a relay failure as the app will see it.
type Error struct {
	Status int
	Code   string
	Msg    string // one line, no secrets, names where it happened
	Err    error  // the cause, for logs
	// Close marks a response sent down a tunnel stream as the stream's
	// last (Connection: close), when the request's body was left unread.
	Close bool
	// Challenge, for 401 and 407, names the header that says how to
	// authenticate (WWW-Authenticate or Proxy-Authenticate).
	Challenge string
}

// New returns an Error with a formatted message.
func New(status int, code, format string, args ...any) *Error {
	return &Error{Status: status, Code: code, Msg: fmt.Sprintf(format, args...)}
}

// Wrap is New with a cause kept for errors.Is and logs.
func Wrap(err error, status int, code, format string, args ...any) *Error {
	e := New(status, code, format, args...)
	e.Err = err
	return e
}

func (e *Error) Error() string {
	if e.Err != nil {
		return e.Msg + ": " + e.Err.Error()
	}
	return e.Msg
}

func (e *Error) Unwrap() error { return e.Err }

// From maps any relay error to what the app is told. It is the one place
// where causes become statuses.
func From(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	var ne net.Error
	if errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()) {
		return Wrap(err, http.StatusGatewayTimeout, DestinationTimeout, "timed out")
	}
	return Wrap(err, http.StatusBadGateway, TunnelBroken, "relay failed")
}

// Body is the one-line body of e, with its cause when that says more.
func (e *Error) body() string {
	msg := e.Msg
	if e.Err != nil && e.Status >= 500 {
		msg += ": " + e.Err.Error()
	}
	return strings.ReplaceAll(msg, "\n", " ") + "\n"
}

func (e *Error) setHeaders(h http.Header) {
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set(Header, e.Code)
	if e.Status == http.StatusServiceUnavailable {
		h.Set("Retry-After", strconv.Itoa(RetryAfter))
	}
	if e.Challenge != "" {
		h[e.Challenge] = []string{`Basic realm="wsp"`, `Bearer realm="wsp"`}
	}
}

// Write answers w with e.
func Write(w http.ResponseWriter, e *Error) {
	e.setHeaders(w.Header())
	w.WriteHeader(e.Status)
	io.WriteString(w, e.body())
}

// WriteResponse writes e as a complete HTTP/1.1 response, for answers sent
// down a tunnel stream rather than through a ResponseWriter.
func WriteResponse(w io.Writer, e *Error) error {
	body := e.body()
	resp := &http.Response{
		StatusCode:    e.Status,
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        http.Header{},
		ContentLength: int64(len(body)),
		Body:          io.NopCloser(strings.NewReader(body)),
		Close:         e.Close,
	}
	e.setHeaders(resp.Header)
	return resp.Write(w)
}
