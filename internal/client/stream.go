package client

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/textproto"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"wsp/internal/httperr"
	"wsp/internal/tunnel"
)

const (
	// headTimeout bounds how long the server may take to send a request
	// head on a stream it opened.
	headTimeout = 30 * time.Second
)

var (
	streamReaders = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 4096) }}
	streamWriters = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 4096) }}
	copyBuffers   = sync.Pool{New: func() any { b := make([]byte, tunnel.CopyBufferSize); return &b }}
)

// hopHeaders are meaningful for one connection only (RFC 9110 7.6.1).
var hopHeaders = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

// handle serves one stream: requests from the server, one after another
// (the server reuses a stream that ended an exchange cleanly), each executed
// against its destination and the answer streamed back. It owns st.
func (c *Client) handle(st net.Conn, streams *streamSet) {
	defer st.Close()
	br := streamReaders.Get().(*bufio.Reader)
	br.Reset(st)
	bw := streamWriters.Get().(*bufio.Writer)
	bw.Reset(st)
	defer func() {
		br.Reset(nil)
		streamReaders.Put(br)
		bw.Reset(nil)
		streamWriters.Put(bw)
	}()
	for {
		// Between exchanges the stream waits as long as the server keeps
		// it; a request's head, once begun, must arrive promptly.
		if _, err := br.Peek(1); err != nil {
			return
		}
		if !streams.begin(st) {
			return // draining: the server sends this request elsewhere
		}
		c.metrics.InFlight(1)
		st.SetReadDeadline(time.Now().Add(headTimeout))
		req, err := http.ReadRequest(br)
		st.SetReadDeadline(time.Time{})
		var keep bool
		var x *exchange
		if err != nil {
			c.log.Warn("unreadable request from server", "cause", err)
			c.answer(bw, httperr.Wrap(err, http.StatusBadRequest, httperr.BadRequest, "client %q could not read the relayed request", c.cfg.ID))
		} else {
			keep, x = c.serve1(st, br, bw, req)
		}
		streams.end(st)
		c.metrics.InFlight(-1)
		if x != nil {
			// The exchange's watcher now waits for the next request.
			keep = x.wait(keep)
		}
		if !keep {
			return
		}
	}
}

// serve1 serves one request and reports whether the stream may carry the
// next one: it may when both the request and the answer went through whole.
// The exchange, when there is one, must then be waited for.
func (c *Client) serve1(st net.Conn, br *bufio.Reader, bw *bufio.Writer, req *http.Request) (bool, *exchange) {
	hasBody := req.Body != nil && req.Body != http.NoBody
	kind := "http"
	switch {
	case req.Method == http.MethodConnect:
		kind = "connect"
	case tunnel.UpgradeType(req.Header) != "":
		kind = "upgrade"
	}
	if e := c.admit(req); e != nil {
		c.metrics.Request(kind, e.Status)
		c.log.Info("request refused", "method", req.Method, "host", req.URL.Host, "status", e.Status, "cause", e.Error())
		if hasBody {
			e.Close = true // its body is left unread: the stream cannot go on
		}
		c.answer(bw, e)
		return !hasBody, nil
	}
	if req.Method == http.MethodConnect {
		c.metrics.Request(kind, c.connect(st, br, bw, req))
		return false, nil
	}
	x := &exchange{c: c, st: st, br: br, bw: bw, req: req, upgrade: tunnel.UpgradeType(req.Header)}
	keep := x.run()
	c.metrics.Request(kind, x.status)
	return keep, x
}

// connect serves CONNECT host:port: it dials the destination, answers 200
// and joins the stream to the connection, half-closes included. The stream
// ends with the tunnel.
func (c *Client) connect(st net.Conn, br *bufio.Reader, bw *bufio.Writer, req *http.Request) (status int) {
	target := req.URL.Host
	ctx, cancel := context.WithTimeout(context.Background(), c.cfg.DialTimeout.D())
	conn, err := c.backends.dialer.DialContext(ctx, "tcp", target)
	cancel()
	if err != nil {
		e := dialError(c.cfg.ID, target, err)
		c.log.Info("tunnel failed", "host", target, "status", e.Status, "cause", e.Error())
		c.answer(bw, e)
		return e.Status
	}
	bw.WriteString("HTTP/1.1 200 Connection established\r\n\r\n")
	if err := bw.Flush(); err != nil {
		conn.Close()
		return 0
	}
	tunnel.Join(tunnel.End{Conn: st, Reader: br}, tunnel.End{Conn: conn}, 0)
	return http.StatusOK
}

// admit checks a request before any byte of it goes anywhere. Rules match
// the URL, or host:port for CONNECT.
func (c *Client) admit(req *http.Request) *httperr.Error {
	u := req.URL
	target := u.String()
	if req.Method == http.MethodConnect {
		target = u.Host
		if _, port, err := net.SplitHostPort(target); err != nil || port == "" {
			return httperr.New(http.StatusBadRequest, httperr.BadDestination, "client %q: CONNECT %q: want host:port", c.cfg.ID, target)
		}
	} else if u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return httperr.New(http.StatusBadRequest, httperr.BadDestination, "client %q: destination %q is not an absolute http(s) URL", c.cfg.ID, redact(u))
	}
	if err := c.rules.Check(req.Method, target, req.Header); err != nil {
		return httperr.New(http.StatusForbidden, httperr.ClientRefused, "refused by the rules of client %q: %s %s: %s", c.cfg.ID, req.Method, redact(u), err)
	}
	upgrade := tunnel.UpgradeType(req.Header)
	if upgrade != "" && req.Body != nil && req.Body != http.NoBody {
		// After a 101 the stream is a byte pipe: a body in flight would
		// mix into it.
		return httperr.New(http.StatusBadRequest, httperr.BadRequest, "client %q: a protocol upgrade cannot carry a request body", c.cfg.ID)
	}
	for name := range req.Header {
		if strings.HasPrefix(name, "X-Proxy-") {
			delete(req.Header, name)
		}
	}
	removeHopHeaders(req.Header)
	if upgrade != "" {
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Upgrade", upgrade)
	}
	return nil
}

// redact drops the user info and query of a URL for messages and logs.
func redact(u *url.URL) string {
	r := *u
	r.User, r.RawQuery, r.Fragment = nil, "", ""
	return r.String()
}

// removeHopHeaders deletes the headers meant for one connection only: the
// standard ones and those the Connection header names.
func removeHopHeaders(h http.Header) {
	for _, v := range h["Connection"] {
		for _, name := range strings.Split(v, ",") {
			if name = textproto.TrimString(name); name != "" {
				h.Del(name)
			}
		}
	}
	for _, name := range hopHeaders {
		h.Del(name)
	}
}

// refuse answers a stream with e without reading its request.
func (c *Client) refuse(st net.Conn, e *httperr.Error) {
	defer st.Close()
	bw := streamWriters.Get().(*bufio.Writer)
	bw.Reset(st)
	c.answer(bw, e)
	bw.Reset(nil)
	streamWriters.Put(bw)
}

func (c *Client) answer(bw *bufio.Writer, e *httperr.Error) {
	if httperr.WriteResponse(bw, e) == nil {
		bw.Flush()
	}
}

// exchange is one request executed against its destination. Two goroutines
// work on it: run (reads the answer, writes it to the stream) and watch
// (sends the request body, then waits for the server to close the stream,
// which before the end of the answer means the app went away).
type exchange struct {
	c   *Client
	st  net.Conn
	br  *bufio.Reader // the stream, read side
	bw  *bufio.Writer // the stream, write side
	req *http.Request
	// watching is closed when the watch goroutine is done; nil if none
	// was started. Set before it starts, by run's goroutine.
	watching chan struct{}
	// next: the server sent another request. Written by watch before it
	// closes watching.
	next bool
	// upgrade is the protocol the request asks to switch to (WebSocket),
	// or "". The stream then becomes a byte pipe on a 101 answer.
	upgrade string
	// status is what the server was answered: the destination's status
	// or wsp's error; 0 when nothing was. Written by run's goroutine.
	status int

	mu       sync.Mutex
	headDone bool         // guarded by mu: the answer head came (or never will)
	bc       *backendConn // guarded by mu; nil once finished
	finished bool         // guarded by mu: the answer is complete, cancelling is moot
	aborted  bool         // guarded by mu: the server gave up on the request
}

// run executes the request and answers the server. It reports whether the
// exchange went through whole on the stream's side: the request body was
// read to its end and the answer written to its end.
func (x *exchange) run() (keep bool) {
	hasBody := x.req.Body != nil && x.req.Body != http.NoBody
	sentBody := make(chan error, 1)
	if !hasBody {
		sentBody <- nil
		if x.upgrade == "" {
			// An upgrade has no watcher: after a 101 the stream is read by
			// the byte pipe, which sees the server's close itself.
			x.startWatch(nil, nil)
		}
	}
	var resp *http.Response
	var bc *backendConn
	for attempt := 0; ; attempt++ {
		x.mu.Lock()
		x.headDone = false // a retry waits for its own answer head
		x.mu.Unlock()
		// Connecting, TLS handshake included, is bounded as a whole.
		ctx, cancel := context.WithTimeout(context.Background(), x.c.cfg.DialTimeout.D())
		var reused bool
		var err error
		bc, reused, err = x.c.backends.get(ctx, x.req.URL)
		cancel()
		if err != nil {
			return x.fail(dialError(x.c.cfg.ID, x.req.URL.Host, err), hasBody)
		}
		if !x.attach(bc) {
			bc.Close()
			return false
		}
		if hasBody {
			// The watcher starts the header timeout once the body is out,
			// so a long upload is not taken for a silent destination.
			x.startWatch(bc, sentBody)
		} else {
			err = x.req.Write(bc.bw)
			if err == nil {
				err = bc.bw.Flush()
			}
			x.startHeaderTimeout(bc)
		}
		if err == nil {
			resp, err = readResponse(bc.br, x.req)
		}
		x.gotHead(bc)
		if err == nil {
			x.status = resp.StatusCode
			break
		}
		bc.Close()
		if reused && !hasBody && attempt == 0 && staleConn(err) && replayable(x.req) {
			continue // the destination closed the idle connection: dial afresh
		}
		return x.fail(destinationError(x.c.cfg.ID, x.req.URL.Host, err), hasBody)
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		return x.switchProtocols(resp, bc)
	}
	keep = x.respond(resp, bc)
	if keep {
		select {
		case err := <-sentBody:
			keep = err == nil
		default:
			keep = false // the destination answered before taking the whole body
		}
	}
	if x.finish() && keep && !resp.Close {
		x.c.backends.put(bc)
	} else {
		bc.Close()
	}
	return keep
}

// progressWriter gives every write d to complete.
type progressWriter struct {
	conn net.Conn
	d    time.Duration
}

func (w progressWriter) Write(p []byte) (int, error) {
	w.conn.SetWriteDeadline(time.Now().Add(w.d))
	return w.conn.Write(p)
}

// startHeaderTimeout bounds the wait for the destination's answer head,
// from the moment the whole request is out, unless the head already came.
func (x *exchange) startHeaderTimeout(bc *backendConn) {
	d := x.c.cfg.HeaderTimeout.D()
	if d <= 0 {
		return
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if !x.headDone {
		bc.SetReadDeadline(time.Now().Add(d))
	}
}

// gotHead ends the header timeout.
func (x *exchange) gotHead(bc *backendConn) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.headDone = true
	bc.SetReadDeadline(time.Time{})
}

// replayable reports whether a request may be sent again when a kept-alive
// connection turns out closed, as net/http decides: idempotent methods, or
// an idempotency key.
func replayable(req *http.Request) bool {
	switch req.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	return req.Header.Get("Idempotency-Key") != "" || req.Header.Get("X-Idempotency-Key") != ""
}

// switchProtocols relays a 101 answer and joins the stream to the
// destination's connection: a WebSocket (or other upgraded protocol) runs
// end to end until either side closes.
// It reports whether the stream may go on (only when the 101 was refused).
func (x *exchange) switchProtocols(resp *http.Response, bc *backendConn) bool {
	if x.upgrade == "" || !strings.EqualFold(x.upgrade, resp.Header.Get("Upgrade")) {
		// Not what was asked for: the server is answered, never left with
		// an executed request and no answer.
		bc.Close()
		return x.fail(httperr.New(http.StatusBadGateway, httperr.DestinationBroken, "client %q: %s switched to protocol %q when %q was asked for", x.c.cfg.ID, x.req.URL.Host, resp.Header.Get("Upgrade"), x.upgrade), x.req.Body != nil && x.req.Body != http.NoBody)
	}
	if !x.finish() {
		bc.Close() // the app is gone
		return false
	}
	writeHead(x.bw, resp, x.req.Method)
	if err := x.bw.Flush(); err != nil {
		bc.Close()
		return false
	}
	tunnel.Join(tunnel.End{Conn: x.st, Reader: x.br}, tunnel.End{Conn: bc.Conn, Reader: bc.br}, 0)
	return false
}

// startWatch runs watch in a goroutine that wait waits for.
func (x *exchange) startWatch(bc *backendConn, sent chan<- error) {
	x.watching = make(chan struct{})
	go func() {
		defer close(x.watching)
		x.watch(bc, sent)
	}()
}

// wait ends the exchange. When it did not go through whole it closes the
// stream, which tells the server this stream is done, and stops the watcher.
// Otherwise the watcher waits for the server's next request or the end of
// the stream; wait reports whether a next request came.
func (x *exchange) wait(keep bool) bool {
	if !keep {
		x.st.Close()
		stopReading(x.st)
	}
	if x.watching == nil {
		return false
	}
	<-x.watching
	return keep && x.next
}

// stopReading makes pending and future reads of a closed stream fail at
// once. A reader left waiting on a stream closed on this side would spin
// when the session shuts down (yamux v0.1.2 loops between its shutdown
// signal and a state that still allows reads), delaying the shutdown.
func stopReading(st net.Conn) {
	st.SetReadDeadline(time.Now())
}

// respond streams resp to the server. It reports whether bc ended the
// exchange cleanly and may serve another request.
func (x *exchange) respond(resp *http.Response, bc *backendConn) (complete bool) {
	defer func() {
		if !complete {
			// Closing the body would read the rest of the answer, which
			// may never end: cut the connection first.
			bc.Close()
		}
		resp.Body.Close()
	}()
	chunked := writeHead(x.bw, resp, x.req.Method)
	if bc.br.Buffered() == 0 {
		// No body byte is here yet, and it may be long coming (a long
		// poll, an event stream before its first event): the head goes
		// now. Otherwise it goes out with the first body bytes.
		if err := x.bw.Flush(); err != nil {
			return false
		}
	}
	bufp := copyBuffers.Get().(*[]byte)
	defer copyBuffers.Put(bufp)
	buf := *bufp
	var body io.Writer = x.bw
	var cw io.WriteCloser
	if chunked {
		cw = httputil.NewChunkedWriter(x.bw)
		body = cw
	}
	for {
		n, rerr := resp.Body.Read(buf)
		if rerr == io.EOF {
			// Done with the destination before the last bytes go out, so a
			// stream closed right after them is not taken for a cancel.
			x.finish()
		}
		if n > 0 {
			if _, err := body.Write(buf[:n]); err != nil {
				return false
			}
			if rerr == nil {
				// Flush every read: an event stream's events must not wait
				// for the buffer to fill.
				if err := x.bw.Flush(); err != nil {
					return false
				}
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			if !x.isAborted() {
				x.c.log.Info("destination broke the answer", "host", x.req.URL.Host, "cause", rerr)
			}
			// At least the head goes out, so the server sees a broken
			// answer, never a request executed and left unanswered.
			x.bw.Flush()
			return false // the stream ends unterminated: the server sees a broken answer
		}
	}
	if chunked {
		cw.Close()
		resp.Trailer.Write(x.bw)
		io.WriteString(x.bw, "\r\n")
	}
	if err := x.bw.Flush(); err != nil {
		return false
	}
	// The exchange is whole on the stream even when the destination
	// closes its connection (resp.Close): only that connection is not reused.
	return true
}

// watch writes the request body if bc is set, then waits for what the
// server sends next: a new request (the exchange is over) or the end of the
// stream, which before the answer is complete means the app went away, so
// the request is cancelled and the destination sees its connection closed.
func (x *exchange) watch(bc *backendConn, sent chan<- error) {
	if bc != nil {
		// A destination that stops reading the body must not hold this
		// goroutine for ever: each write has to make progress within
		// headertimeout.
		d := x.c.cfg.HeaderTimeout.D()
		if d > 0 {
			bc.bw.Reset(progressWriter{bc.Conn, d})
		}
		err := x.req.Write(bc.bw)
		if err == nil {
			err = bc.bw.Flush()
		}
		if d > 0 {
			// Before run may pool bc (it waits for sent): as it was.
			bc.bw.Reset(bc.Conn)
			bc.SetWriteDeadline(time.Time{})
		}
		if err == nil {
			x.startHeaderTimeout(bc)
		}
		sent <- err
		if err != nil {
			bc.Close() // unblocks run's read of the answer
		}
		if x.upgrade != "" {
			// After a 101 the stream belongs to the byte pipe: this
			// goroutine must not read it.
			return
		}
	}
	if _, err := x.br.Peek(1); err == nil {
		x.next = true
		return
	}
	x.abort()
}

// attach makes bc the connection an abort closes; false if already aborted.
func (x *exchange) attach(bc *backendConn) bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.bc = bc
	return !x.aborted
}

func (x *exchange) abort() {
	x.mu.Lock()
	if x.finished {
		x.mu.Unlock()
		return
	}
	x.aborted = true
	bc := x.bc
	x.mu.Unlock()
	// A write to the stream blocked on a full window would otherwise wait
	// for the server's stream close timeout.
	x.st.SetWriteDeadline(time.Now())
	if bc != nil {
		bc.Close() // may write (TLS close_notify): not under mu
	}
}

// finish marks the destination's part done; false if it was aborted first.
func (x *exchange) finish() bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.finished = true
	return !x.aborted
}

func (x *exchange) isAborted() bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.aborted
}

// fail answers the server with e, unless it already gave up, and reports
// whether the stream may go on (not when the request's body is unread).
func (x *exchange) fail(e *httperr.Error, hasBody bool) (keep bool) {
	if x.isAborted() {
		return false
	}
	x.c.log.Info("request failed", "method", x.req.Method, "host", x.req.URL.Host, "status", e.Status, "cause", e.Error())
	e.Close = hasBody
	x.status = e.Status
	x.c.answer(x.bw, e)
	return !hasBody
}

// readResponse reads the final answer, skipping informational ones (100
// Continue, 103 Early Hints): the server's side answers those itself.
func readResponse(br *bufio.Reader, req *http.Request) (*http.Response, error) {
	// ReadResponse reports a connection closed before the first byte as
	// io.ErrUnexpectedEOF; staleConn needs to see it as the io.EOF it is.
	if _, err := br.Peek(1); err != nil {
		return nil, err
	}
	for {
		resp, err := http.ReadResponse(br, req)
		if err != nil {
			return nil, err
		}
		if resp.StatusCode >= 200 || resp.StatusCode == http.StatusSwitchingProtocols {
			return resp, nil
		}
	}
}

// writeHead writes resp's status line and headers for the tunnel, with
// framing chosen here: the length when known, else chunked (which carries
// trailers). It reports whether the body goes chunked.
func writeHead(w *bufio.Writer, resp *http.Response, method string) (chunked bool) {
	upgrade := resp.Header.Get("Upgrade")
	removeHopHeaders(resp.Header)
	if resp.StatusCode == http.StatusSwitchingProtocols {
		resp.Header.Set("Connection", "Upgrade")
		resp.Header.Set("Upgrade", upgrade)
	}
	resp.Header.Del("Content-Length")
	status := resp.Status
	if status == "" {
		status = strconv.Itoa(resp.StatusCode) + " " + http.StatusText(resp.StatusCode)
	}
	w.WriteString("HTTP/1.1 ")
	w.WriteString(status)
	w.WriteString("\r\n")
	resp.Header.Write(w)
	noBody := method == http.MethodHead || resp.StatusCode == http.StatusNoContent || resp.StatusCode == http.StatusNotModified || resp.StatusCode == http.StatusSwitchingProtocols
	switch {
	case resp.ContentLength >= 0 && resp.StatusCode != http.StatusNoContent:
		w.WriteString("Content-Length: ")
		w.WriteString(strconv.FormatInt(resp.ContentLength, 10))
		w.WriteString("\r\n")
	case !noBody:
		chunked = true
		w.WriteString("Transfer-Encoding: chunked\r\n")
		if len(resp.Trailer) > 0 {
			names := make([]string, 0, len(resp.Trailer))
			for k := range resp.Trailer {
				names = append(names, k)
			}
			w.WriteString("Trailer: " + strings.Join(names, ", ") + "\r\n")
		}
	}
	w.WriteString("\r\n")
	return chunked
}

// staleConn reports whether err is what a reused connection that the
// destination closed while idle gives, before any byte of an answer.
func staleConn(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

func dialError(clientID, host string, err error) *httperr.Error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return httperr.Wrap(err, http.StatusGatewayTimeout, httperr.DestinationTimeout, "client %q timed out connecting to %s", clientID, host)
	}
	return httperr.Wrap(err, http.StatusBadGateway, httperr.DialFailed, "client %q could not reach %s", clientID, host)
}

func destinationError(clientID, host string, err error) *httperr.Error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return httperr.Wrap(err, http.StatusGatewayTimeout, httperr.DestinationTimeout, "client %q: %s did not answer in time", clientID, host)
	}
	return httperr.Wrap(err, http.StatusBadGateway, httperr.DestinationBroken, "client %q: %s broke the exchange", clientID, host)
}
