package httperr

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"syscall"
	"testing"
)

type timeoutError struct{}

func (timeoutError) Error() string   { return "i/o timeout" }
func (timeoutError) Timeout() bool   { return true }
func (timeoutError) Temporary() bool { return true }

func TestFromPassesErrorThrough(t *testing.T) {
	e := New(http.StatusForbidden, ServerRefused, "refused by rule %d", 3)
	for _, err := range []error{
		e,
		fmt.Errorf("relay: %w", e),
		fmt.Errorf("outer: %w", fmt.Errorf("inner: %w", e)),
		errors.Join(errors.New("other"), e),
	} {
		if got := From(err); got != e {
			t.Errorf("From(%v) = %#v, want the *Error itself", err, got)
		}
	}
}

func TestFrom(t *testing.T) {
	for _, tc := range []struct {
		name   string
		err    error
		status int
		code   string
	}{
		{"deadline", context.DeadlineExceeded, http.StatusGatewayTimeout, DestinationTimeout},
		{"wrapped deadline", fmt.Errorf("round trip: %w", context.DeadlineExceeded), http.StatusGatewayTimeout, DestinationTimeout},
		{"net timeout", &net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}, http.StatusGatewayTimeout, DestinationTimeout},
		{"custom net.Error timeout", timeoutError{}, http.StatusGatewayTimeout, DestinationTimeout},
		{"wrapped net.Error timeout", fmt.Errorf("x: %w", timeoutError{}), http.StatusGatewayTimeout, DestinationTimeout},
		{"plain", errors.New("boom"), http.StatusBadGateway, TunnelBroken},
		{"EOF", io.ErrUnexpectedEOF, http.StatusBadGateway, TunnelBroken},
		{"net error, no timeout", &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}, http.StatusBadGateway, TunnelBroken},
		{"canceled", context.Canceled, http.StatusBadGateway, TunnelBroken},
	} {
		got := From(tc.err)
		if got.Status != tc.status || got.Code != tc.code {
			t.Errorf("%s: From = %d %s, want %d %s", tc.name, got.Status, got.Code, tc.status, tc.code)
		}
		if !errors.Is(got, tc.err) || got.Unwrap() != tc.err {
			t.Errorf("%s: the cause is not kept", tc.name)
		}
		if !strings.Contains(got.Error(), tc.err.Error()) {
			t.Errorf("%s: Error() = %q lacks the cause", tc.name, got.Error())
		}
	}
}

func TestErrorString(t *testing.T) {
	if got := New(400, BadRequest, "bad %s", "thing").Error(); got != "bad thing" {
		t.Errorf("Error() = %q", got)
	}
	cause := errors.New("cause")
	e := Wrap(cause, 502, DialFailed, "could not reach %s", "api")
	if e.Error() != "could not reach api: cause" || !errors.Is(e, cause) {
		t.Errorf("Wrap: Error() = %q, Is = %v", e.Error(), errors.Is(e, cause))
	}
}

func TestWrite(t *testing.T) {
	for _, tc := range []struct {
		name       string
		e          *Error
		wantBody   string
		retryAfter bool
	}{
		{"400", New(400, BadDestination, "missing header"), "missing header\n", false},
		{"403 hides its cause", Wrap(errors.New("rule 7"), 403, ServerRefused, "refused"), "refused\n", false},
		{"502 with cause", Wrap(errors.New("connection reset"), 502, TunnelBroken, "relay failed"), "relay failed: connection reset\n", false},
		{"503", New(503, NoClient, "no client is connected"), "no client is connected\n", true},
		{"504", New(504, ClientBusy, "all busy"), "all busy\n", false},
		{"newline in message", New(400, BadRequest, "line one\nline two\n"), "line one line two \n", false},
		{"newline in cause", Wrap(errors.New("a\nb"), 502, TunnelBroken, "x"), "x: a b\n", false},
		{"empty message", New(502, TunnelBroken, ""), "\n", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			Write(rec, tc.e)
			if rec.Code != tc.e.Status {
				t.Errorf("status %d, want %d", rec.Code, tc.e.Status)
			}
			h := rec.Header()
			if h.Get(Header) != tc.e.Code {
				t.Errorf("%s = %q, want %q", Header, h.Get(Header), tc.e.Code)
			}
			if ct := h.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
				t.Errorf("Content-Type = %q", ct)
			}
			if h.Get("X-Content-Type-Options") != "nosniff" {
				t.Error("no X-Content-Type-Options: nosniff")
			}
			if got := h.Get("Retry-After") != ""; got != tc.retryAfter {
				t.Errorf("Retry-After %q, want set: %v", h.Get("Retry-After"), tc.retryAfter)
			}
			body := rec.Body.String()
			if body != tc.wantBody {
				t.Errorf("body %q, want %q", body, tc.wantBody)
			}
			if strings.Count(body, "\n") != 1 || !strings.HasSuffix(body, "\n") {
				t.Errorf("body %q is not one line", body)
			}
		})
	}
}

func TestWriteResponse(t *testing.T) {
	for _, e := range []*Error{
		New(400, BadRequest, "bad"),
		Wrap(errors.New("refused"), 502, DialFailed, "client %q could not reach %s", "dc1", "api:80"),
		New(503, NoClient, "nobody\r\nX-Injected: 1"),
		New(504, DestinationTimeout, "slow"),
		{Status: 400, Code: BadRequest, Msg: "body left unread", Close: true},
	} {
		var buf bytes.Buffer
		if err := WriteResponse(&buf, e); err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(&buf)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("%q: %v", buf.String(), err)
		}
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		if br.Buffered() != 0 {
			t.Errorf("%d bytes after the response", br.Buffered())
		}
		rec := httptest.NewRecorder()
		Write(rec, e)
		if resp.StatusCode != e.Status || resp.ProtoMajor != 1 || resp.ProtoMinor != 1 {
			t.Errorf("status %d %s, want %d HTTP/1.1", resp.StatusCode, resp.Proto, e.Status)
		}
		if string(body) != rec.Body.String() || resp.ContentLength != int64(len(body)) {
			t.Errorf("body %q (length %d), want %q as Write sends", body, resp.ContentLength, rec.Body.String())
		}
		for _, name := range []string{Header, "Content-Type", "X-Content-Type-Options", "Retry-After"} {
			if got, want := resp.Header.Get(name), rec.Header().Get(name); got != want {
				t.Errorf("%s = %q, want %q as Write sends", name, got, want)
			}
		}
		if resp.Header.Get("X-Injected") != "" {
			t.Error("a message injected a header")
		}
		if resp.Close != e.Close {
			t.Errorf("Close = %v, want %v", resp.Close, e.Close)
		}
	}
}

// Whatever the message, the answer is one well-formed response with a
// one-line body.
func FuzzWriteResponse(f *testing.F) {
	f.Add(502, "relay failed", "cause")
	f.Add(503, "a\nb\r\nc", "")
	f.Add(400, "", "\x00\xff")
	f.Fuzz(func(t *testing.T, status int, msg, cause string) {
		status = 400 + ((status%200)+200)%200 // 400..599
		e := New(status, TunnelBroken, "%s", msg)
		if cause != "" {
			e.Err = errors.New(cause)
		}
		var buf bytes.Buffer
		if err := WriteResponse(&buf, e); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(&buf), nil)
		if err != nil {
			t.Fatalf("%q: %v", buf.String(), err)
		}
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != status || strings.Count(string(body), "\n") != 1 || !strings.HasSuffix(string(body), "\n") {
			t.Fatalf("status %d body %q", resp.StatusCode, body)
		}
	})
}
