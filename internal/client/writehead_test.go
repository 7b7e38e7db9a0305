package client

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// relayed runs resp through writeHead as the client does, appends body with
// the framing writeHead chose, and parses the result as the server would.
func relayed(t *testing.T, resp *http.Response, method, body string) (head string, chunked bool, got *http.Response, gotBody string) {
	t.Helper()
	var buf bytes.Buffer
	bw := bufio.NewWriter(&buf)
	chunked = writeHead(bw, resp, method)
	if err := bw.Flush(); err != nil {
		t.Fatal(err)
	}
	head = buf.String()
	if chunked {
		cw := httputil.NewChunkedWriter(&buf)
		io.WriteString(cw, body)
		cw.Close()
		resp.Trailer.Write(&buf)
		buf.WriteString("\r\n")
	} else {
		buf.WriteString(body)
	}
	br := bufio.NewReader(&buf)
	got, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("parsing %q: %v", buf.String(), err)
	}
	b, err := io.ReadAll(got.Body)
	if err != nil {
		t.Fatalf("reading the body of %q: %v", head, err)
	}
	got.Body.Close()
	if br.Buffered() > 0 {
		t.Fatalf("%d bytes left after the response: framing is wrong in %q", br.Buffered(), head)
	}
	return head, chunked, got, string(b)
}

func TestWriteHead(t *testing.T) {
	hop := func() http.Header {
		return http.Header{
			"Connection":          {"close, X-Hop"},
			"X-Hop":               {"1"},
			"Keep-Alive":          {"timeout=5"},
			"Transfer-Encoding":   {"chunked"},
			"Proxy-Connection":    {"keep-alive"},
			"Upgrade":             {"h2c"},
			"Te":                  {"trailers"},
			"Proxy-Authenticate":  {"Basic"},
			"Proxy-Authorization": {"Basic eDp5"},
			"Content-Length":      {"999"}, // stale: the framing is writeHead's
			"X-Keep":              {"yes"},
			"Content-Type":        {"text/plain"},
		}
	}
	for _, tc := range []struct {
		name        string
		method      string
		status      int
		statusText  string // resp.Status; "" derives it
		length      int64
		trailer     http.Header // declared trailers, with the values sent after the body
		body        string
		wantChunked bool
		wantLength  int64
		wantLine    string // a line the head must hold
		noLine      string // a line prefix the head must not hold
	}{
		{name: "length known", method: "GET", status: 200, length: 5, body: "hello", wantLength: 5, wantLine: "Content-Length: 5", noLine: "Transfer-Encoding"},
		{name: "empty body", method: "GET", status: 200, length: 0, wantLength: 0, wantLine: "Content-Length: 0", noLine: "Transfer-Encoding"},
		{name: "length unknown", method: "GET", status: 200, length: -1, body: "streamed, length unknown", wantChunked: true, wantLength: -1, wantLine: "Transfer-Encoding: chunked", noLine: "Content-Length"},
		{name: "length unknown, trailers", method: "POST", status: 201, length: -1, trailer: http.Header{"X-Checksum": {"abc"}}, body: "with trailers", wantChunked: true, wantLength: -1, wantLine: "Trailer: X-Checksum", noLine: "Content-Length"},
		{name: "HEAD with length", method: "HEAD", status: 200, length: 1234, wantLength: 1234, wantLine: "Content-Length: 1234", noLine: "Transfer-Encoding"},
		{name: "HEAD without length", method: "HEAD", status: 200, length: -1, wantLength: -1, noLine: "Transfer-Encoding"},
		{name: "204", method: "GET", status: 204, length: 0, wantLength: 0, noLine: "Content-Length"},
		{name: "204 length unknown", method: "DELETE", status: 204, length: -1, wantLength: 0, noLine: "Transfer-Encoding"},
		{name: "304 length unknown", method: "GET", status: 304, length: -1, wantLength: 0, noLine: "Transfer-Encoding"},
		{name: "304", method: "GET", status: 304, length: 0, wantLength: 0, noLine: "Transfer-Encoding"},
		{name: "status text derived", method: "GET", status: 404, length: 4, body: "nope", wantLength: 4, wantLine: "HTTP/1.1 404 Not Found"},
		{name: "status text kept", method: "GET", status: 299, statusText: "299 Custom Reason", length: 0, wantLength: 0, wantLine: "HTTP/1.1 299 Custom Reason"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := &http.Response{StatusCode: tc.status, Status: tc.statusText, Header: hop(), ContentLength: tc.length}
			if tc.trailer != nil {
				resp.Trailer = http.Header{}
				for k := range tc.trailer {
					resp.Trailer[k] = nil // declared, as ReadResponse leaves them
				}
			}
			head, chunked, got, body := func() (string, bool, *http.Response, string) {
				if tc.trailer == nil {
					return relayed(t, resp, tc.method, tc.body)
				}
				// The values arrive with the end of the body.
				var buf bytes.Buffer
				bw := bufio.NewWriter(&buf)
				ch := writeHead(bw, resp, tc.method)
				bw.Flush()
				head := buf.String()
				cw := httputil.NewChunkedWriter(&buf)
				io.WriteString(cw, tc.body)
				cw.Close()
				tc.trailer.Write(&buf)
				buf.WriteString("\r\n")
				got, err := http.ReadResponse(bufio.NewReader(&buf), &http.Request{Method: tc.method})
				if err != nil {
					t.Fatal(err)
				}
				b, err := io.ReadAll(got.Body)
				if err != nil {
					t.Fatal(err)
				}
				return head, ch, got, string(b)
			}()
			if chunked != tc.wantChunked {
				t.Errorf("chunked = %v, want %v; head:\n%s", chunked, tc.wantChunked, head)
			}
			if got.StatusCode != tc.status {
				t.Errorf("status %d, want %d", got.StatusCode, tc.status)
			}
			if got.ContentLength != tc.wantLength {
				t.Errorf("ContentLength %d, want %d; head:\n%s", got.ContentLength, tc.wantLength, head)
			}
			if tc.wantChunked != (len(got.TransferEncoding) == 1 && got.TransferEncoding[0] == "chunked") {
				t.Errorf("TransferEncoding %q; head:\n%s", got.TransferEncoding, head)
			}
			if body != tc.body {
				t.Errorf("body %q, want %q", body, tc.body)
			}
			lines := strings.Split(head, "\r\n")
			if tc.wantLine != "" && !contains(lines, func(l string) bool { return l == tc.wantLine }) {
				t.Errorf("head lacks %q:\n%s", tc.wantLine, head)
			}
			if tc.noLine != "" && contains(lines, func(l string) bool { return strings.HasPrefix(l, tc.noLine) }) {
				t.Errorf("head has %s:\n%s", tc.noLine, head)
			}
			if n := strings.Count(head, "Content-Length:"); n > 1 {
				t.Errorf("%d Content-Length lines:\n%s", n, head)
			}
			for _, name := range []string{"Connection", "X-Hop", "Keep-Alive", "Proxy-Connection", "Upgrade", "Te", "Proxy-Authenticate", "Proxy-Authorization"} {
				if v := got.Header.Get(name); v != "" {
					t.Errorf("hop-by-hop %s: %q relayed", name, v)
				}
			}
			if got.Header.Get("X-Keep") != "yes" {
				t.Error("end-to-end header X-Keep lost")
			}
			for k, v := range tc.trailer {
				if g := got.Trailer.Get(k); g != v[0] {
					t.Errorf("trailer %s = %q, want %q", k, g, v[0])
				}
			}
		})
	}
}

// writeHead takes what http.ReadResponse makes of a destination's answer.
func TestWriteHeadFromDestination(t *testing.T) {
	for _, tc := range []struct {
		name, method, upstream string
		wantChunked            bool
		wantBody               string
	}{
		{"content length", "GET", "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nabc", false, "abc"},
		{"chunked", "GET", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", true, "abcde"},
		{"close delimited", "GET", "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close", true, "until close"},
		{"HTTP/1.0", "GET", "HTTP/1.0 200 OK\r\n\r\nold", true, "old"},
		{"HEAD", "HEAD", "HTTP/1.1 200 OK\r\nContent-Length: 77\r\n\r\n", false, ""},
		{"304 with length", "GET", "HTTP/1.1 304 Not Modified\r\nContent-Length: 77\r\nETag: \"x\"\r\n\r\n", false, ""},
		{"204", "GET", "HTTP/1.1 204 No Content\r\n\r\n", false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := &http.Request{Method: tc.method}
			resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(tc.upstream)), req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			head, chunked, got, body := relayed(t, resp, tc.method, string(b))
			if chunked != tc.wantChunked || body != tc.wantBody || got.Close {
				t.Errorf("chunked %v body %q close %v; want %v %q false; head:\n%s", chunked, body, got.Close, tc.wantChunked, tc.wantBody, head)
			}
		})
	}
}

func contains(lines []string, f func(string) bool) bool {
	for _, l := range lines {
		if f(l) {
			return true
		}
	}
	return false
}

func TestRemoveHopHeaders(t *testing.T) {
	for _, tc := range []struct {
		name       string
		in         http.Header
		want, gone []string
	}{
		{
			name: "standard",
			in: http.Header{"Connection": {"keep-alive"}, "Proxy-Connection": {"x"}, "Keep-Alive": {"timeout=5"}, "Proxy-Authenticate": {"x"},
				"Proxy-Authorization": {"x"}, "Te": {"trailers"}, "Trailer": {"X-T"}, "Transfer-Encoding": {"chunked"}, "Upgrade": {"websocket"},
				"Content-Type": {"text/plain"}, "Cache-Control": {"no-store"}},
			want: []string{"Content-Type", "Cache-Control"},
			gone: []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade"},
		},
		{
			name: "named by Connection",
			in:   http.Header{"Connection": {"close, X-Foo"}, "X-Foo": {"1"}, "X-Bar": {"2"}},
			want: []string{"X-Bar"}, gone: []string{"Connection", "X-Foo"},
		},
		{
			name: "several Connection values, odd spacing and case",
			in:   http.Header{"Connection": {"x-a", "  X-B ,x-c,, "}, "X-A": {"1"}, "X-B": {"2"}, "X-C": {"3"}, "X-D": {"4"}},
			want: []string{"X-D"}, gone: []string{"X-A", "X-B", "X-C"},
		},
		{
			name: "nothing to remove",
			in:   http.Header{"Content-Length": {"5"}, "Date": {"today"}},
			want: []string{"Content-Length", "Date"},
		},
		{name: "empty", in: http.Header{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			removeHopHeaders(tc.in)
			for _, k := range tc.want {
				if _, ok := tc.in[k]; !ok {
					t.Errorf("%s removed", k)
				}
			}
			for _, k := range tc.gone {
				if _, ok := tc.in[k]; ok {
					t.Errorf("%s kept", k)
				}
			}
			if len(tc.in) != len(tc.want) {
				t.Errorf("left %v, want only %v", tc.in, tc.want)
			}
		})
	}
}

type timeoutError struct{}

func (timeoutError) Error() string   { return "i/o timeout" }
func (timeoutError) Timeout() bool   { return true }
func (timeoutError) Temporary() bool { return true }

func TestStaleConn(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"EOF", io.EOF, true},
		{"wrapped EOF", fmt.Errorf("read: %w", io.EOF), true},
		{"ECONNRESET in an OpError", &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)}, true},
		{"EPIPE in an OpError", &net.OpError{Op: "write", Net: "tcp", Err: os.NewSyscallError("write", syscall.EPIPE)}, true},
		{"EPIPE wrapped", fmt.Errorf("flush: %w", syscall.EPIPE), true},
		{"deadline", &net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}, false},
		{"timeout", timeoutError{}, false},
		{"context deadline", context.DeadlineExceeded, false},
		{"refused", &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}, false},
		{"malformed", errors.New(`malformed HTTP response "x"`), false},
	} {
		if got := staleConn(tc.err); got != tc.want {
			t.Errorf("%s: staleConn(%v) = %v, want %v", tc.name, tc.err, got, tc.want)
		}
	}
}

// What run actually sees from a kept-alive connection that the destination
// closed while idle: readResponse on a connection closed before any byte.
func TestStaleConnClosedIdle(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Close() // the destination's idle timeout
		}
		accepted <- err
	}()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := <-accepted; err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	req, _ := http.NewRequest("GET", "http://dest.test/", nil)
	_, err = readResponse(bufio.NewReader(conn), req)
	if err == nil || !staleConn(err) {
		t.Fatalf("readResponse on a closed idle connection: %v; staleConn = false, want true", err)
	}
}

func TestReadResponseSkipsInformational(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int
	}{
		{"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 200},
		{"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", 404},
		{"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 101},
	} {
		req, _ := http.NewRequest("GET", "http://dest.test/", nil)
		resp, err := readResponse(bufio.NewReader(strings.NewReader(tc.in)), req)
		if err != nil || resp.StatusCode != tc.want {
			t.Errorf("readResponse(%q) = %v, %v; want %d", tc.in, resp, err, tc.want)
		}
	}
}

func TestErrorMapping(t *testing.T) {
	timeout := &net.OpError{Op: "dial", Net: "tcp", Err: os.ErrDeadlineExceeded}
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	for _, tc := range []struct {
		name   string
		status int
		code   string
		msg    string
		got    func() (int, string, string, error)
	}{
		{"dial timeout", 504, "destination_timeout", "timed out connecting to api:80", func() (int, string, string, error) {
			e := dialError("dc1", "api:80", timeout)
			return e.Status, e.Code, e.Msg, e.Err
		}},
		{"dial refused", 502, "dial_failed", "could not reach api:80", func() (int, string, string, error) {
			e := dialError("dc1", "api:80", refused)
			return e.Status, e.Code, e.Msg, e.Err
		}},
		{"answer timeout", 504, "destination_timeout", "did not answer in time", func() (int, string, string, error) {
			e := destinationError("dc1", "api:80", timeout)
			return e.Status, e.Code, e.Msg, e.Err
		}},
		{"answer broken", 502, "destination_broken", "broke the exchange", func() (int, string, string, error) {
			e := destinationError("dc1", "api:80", io.ErrUnexpectedEOF)
			return e.Status, e.Code, e.Msg, e.Err
		}},
	} {
		status, code, msg, cause := tc.got()
		if status != tc.status || code != tc.code || !strings.Contains(msg, tc.msg) || !strings.Contains(msg, `"dc1"`) || cause == nil {
			t.Errorf("%s: %d %s %q (cause %v); want %d %s containing %q and the client id", tc.name, status, code, msg, cause, tc.status, tc.code, tc.msg)
		}
	}
}
