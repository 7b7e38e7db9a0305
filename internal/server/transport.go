package server

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"

	"wsp/internal/httperr"
	"wsp/internal/metrics"
	"wsp/internal/tunnel"
)

var (
	readerPool = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 4096) }}
	writerPool = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 4096) }}
)

// transport is the RoundTripper of the relay's ReverseProxy: it sends each
// request down its own stream of a client session, written with
// Request.WriteProxy (the absolute URL tells the client where to go), and
// reads the answer with http.ReadResponse. Heads are parsed once per side.
type transport struct {
	metrics *metrics.Server
	reg     *registry
	timeout time.Duration // how long to wait for a session able to serve
}

func (t *transport) RoundTrip(req *http.Request) (*http.Response, error) {
	x := exchangeOf(req.Context())
	// A request with a body goes on a fresh stream: a reused one may turn
	// out to be closed by the client, and only a request whose every byte
	// is still at hand can be sent again.
	fresh := req.Body != nil && req.Body != http.NoBody
	var tried []*session
	for {
		s, st, reused, err := t.open(req.Context(), x, fresh, &tried)
		if err != nil {
			return nil, err
		}
		if s.legacy != nil {
			resp, err := t.legacyExchange(req, s)
			if errors.Is(err, errLegacyUnsent) {
				tried = append(tried, s)
				continue
			}
			return resp, err
		}
		resp, err := t.exchange(req, s, st, reused)
		if errors.Is(err, errClosedIdle) {
			// The client closed the stream while it was idle (it is
			// draining, or the session is ending): it never read the
			// request, so sending it again is safe.
			continue
		}
		if errors.Is(err, errStreamReset) {
			// Never read either, but this session refuses new streams
			// (it is going away, or its backlog is full): another one.
			tried = append(tried, s)
			continue
		}
		return resp, err
	}
}

// open reserves a slot on a session able to serve x, skipping and adding
// to tried the sessions found gone, and returns a stream on it: an idle one
// unless fresh is set. The caller releases the slot.
func (t *transport) open(ctx context.Context, x *exchange, fresh bool, tried *[]*session) (*session, *yamux.Stream, bool, error) {
	for {
		s, err := t.reg.pick(ctx, x.want, *tried, t.timeout)
		if err != nil {
			return nil, nil, false, err
		}
		x.session, x.sessionID, x.clientID = s, s.id, s.clientID
		if s.legacy != nil {
			s.requests.Add(1)
			return s, nil, false, nil
		}
		st, reused, err := s.stream(fresh)
		if err != nil {
			t.reg.release(s)
			t.metrics.StreamOpenFailure()
			if tunnel.IsSessionGone(err) {
				// Nothing was sent: another session may serve it.
				s.gone.Store(true)
				*tried = append(*tried, s)
				continue
			}
			return nil, nil, false, httperr.Wrap(err, http.StatusBadGateway, httperr.TunnelBroken, "opening a stream to client %q failed", s.clientID)
		}
		s.requests.Add(1)
		return s, st, reused, nil
	}
}

// legacyExchange runs req on an old client's connection; the slot is
// freed when the answer's body is closed.
func (t *transport) legacyExchange(req *http.Request, s *session) (*http.Response, error) {
	resp, err := s.legacy.roundTrip(req, s.clientID)
	if err != nil {
		t.reg.release(s)
		return nil, err
	}
	resp.Body = &releasingBody{ReadCloser: resp.Body, release: func() { t.reg.release(s) }}
	return resp, nil
}

// releasingBody frees a session slot when closed, once.
type releasingBody struct {
	io.ReadCloser
	once    sync.Once
	release func()
}

func (b *releasingBody) Close() error {
	b.once.Do(b.release)
	return b.ReadCloser.Close()
}

// errClosedIdle is a reused stream found closed before any byte of an answer.
var errClosedIdle = errors.New("stream closed while idle")

// errStreamReset is a stream the client's multiplexer reset before handing
// it to the client: it crossed the client's go-away, or the client's accept
// backlog was full.
var errStreamReset = errors.New("stream reset by the client's multiplexer")

// exchange sends req on st and returns the response, whose Body owns the
// stream and the session's slot until closed.
func (t *transport) exchange(req *http.Request, s *session, st *yamux.Stream, reused bool) (*http.Response, error) {
	// When the app goes away: unblock a pending read, close the stream
	// (which tells the client to abandon the request) and, should the
	// answer's body never be closed (ReverseProxy drops some rejected
	// upgrades), free the slot.
	var body atomic.Pointer[streamBody]
	stop := context.AfterFunc(req.Context(), func() {
		st.SetReadDeadline(time.Now())
		st.Close()
		if b := body.Load(); b != nil {
			b.finish(false)
		}
	})
	fail := func(err error) (*http.Response, error) {
		stop()
		st.Close()
		t.reg.release(s)
		return nil, err
	}
	broken := func(err error) error {
		return httperr.Wrap(err, http.StatusBadGateway, httperr.TunnelBroken, "the session to client %q broke", s.clientID)
	}

	bw := writerPool.Get().(*bufio.Writer)
	bw.Reset(st)
	var sent chan error // the request is on its way when this yields nil
	if req.Body == nil || req.Body == http.NoBody {
		err := req.WriteProxy(bw)
		if err == nil {
			err = bw.Flush()
		}
		bw.Reset(nil)
		writerPool.Put(bw)
		if errors.Is(err, yamux.ErrConnectionReset) {
			return fail(errStreamReset)
		}
		if err != nil {
			return fail(broken(err))
		}
	} else {
		// The body streams while the answer is read: the client may answer
		// (a refusal, an early error) before the body is complete. This
		// goroutine ends when the body does or the stream closes; http.Server
		// ends the body once the handler returns, so it never outlives the
		// request by more than that.
		sent = make(chan error, 1)
		go func() {
			err := req.WriteProxy(bw)
			if err == nil {
				err = bw.Flush()
			}
			bw.Reset(nil)
			writerPool.Put(bw)
			if err != nil {
				// The answer, if any, says more; the app's body is
				// abandoned and the client sees a truncated request.
				st.Close()
			}
			sent <- err
		}()
	}

	br := readerPool.Get().(*bufio.Reader)
	br.Reset(st)
	// ReadResponse reports a stream closed before the first byte as
	// io.ErrUnexpectedEOF; a reused stream needs to see it as the io.EOF it is.
	_, err := br.Peek(1)
	var resp *http.Response
	if err == nil {
		resp, err = http.ReadResponse(br, req)
	}
	if x := exchangeOf(req.Context()); x.bodyTooLarge.Load() {
		// The client saw a truncated body; its answer, if any, is moot.
		if err == nil {
			resp.Body.Close()
		}
		err = httperr.New(http.StatusRequestEntityTooLarge, httperr.BodyTooLarge, "request body exceeds the limit of %d bytes (maxbodybytes)", x.bodyLimit)
	}
	if err != nil {
		br.Reset(nil)
		readerPool.Put(br)
		if cerr := req.Context().Err(); cerr != nil {
			return fail(cerr)
		}
		if e, ok := errors.AsType[*httperr.Error](err); ok {
			return fail(e)
		}
		if err == io.EOF && sent == nil && !s.mux.IsClosed() {
			// Closed before any byte of an answer by a client still
			// there: it never executes a request it does not answer (it
			// closed the stream idle, or refused it while draining), so
			// the request may go elsewhere. A dying session also ends its
			// streams with EOF, and then the request may have run.
			return fail(errClosedIdle)
		}
		if errors.Is(err, yamux.ErrConnectionReset) && sent == nil {
			// Never handed to the client, so the request did not run.
			return fail(errStreamReset)
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			err = fmt.Errorf("stream closed in the middle of a response: %w", err)
		}
		return fail(broken(err))
	}
	b := &streamBody{ReadCloser: resp.Body, br: br, st: st, resp: resp, sent: sent, upgradeAsked: tunnel.UpgradeType(req.Header) != "", done: func(reuse bool) {
		if !stop() {
			reuse = false // the app went away and the stream is closed
		}
		if reuse {
			s.putIdle(st)
		} else {
			// An upgraded body may still be read: make that fail at once
			// rather than wait on a stream closed on this side.
			st.SetReadDeadline(time.Now())
			st.Close()
		}
		t.reg.release(s)
	}}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		if want := tunnel.UpgradeType(req.Header); want == "" || !strings.EqualFold(want, resp.Header.Get("Upgrade")) {
			// ReverseProxy would refuse it without closing the body.
			b.Close()
			return nil, httperr.New(http.StatusBadGateway, httperr.DestinationBroken, "the destination switched to protocol %q when %q was asked for", resp.Header.Get("Upgrade"), want)
		}
		// ReverseProxy may still read an upgraded body after closing it,
		// so its reader is never recycled.
		b.br = nil
		resp.Body = &upgradedBody{streamBody: b, r: br, w: st}
	} else {
		resp.Body = b
	}
	body.Store(b)
	if req.Context().Err() != nil {
		// The app went away before the body was stored for the
		// AfterFunc: free the slot here.
		b.finish(false)
	}
	return resp, nil
}

// streamBody is a response body read from a stream. Close frees the
// session's slot and, when the exchange ended cleanly, keeps the stream for
// the next request; it is idempotent.
type streamBody struct {
	io.ReadCloser
	br     *bufio.Reader // recycled on Close; nil when it must not be
	st     *yamux.Stream
	resp   *http.Response
	sent   chan error // nil when the request went out whole before the answer was read
	sawEOF bool       // the body was read to its end; Read's and Close's goroutine only
	// upgradeAsked: the request asked to switch protocols; the client never
	// keeps such a stream, whatever the answer.
	upgradeAsked bool
	once         sync.Once // for finish
	closeOnce    sync.Once
	done         func(reuse bool)
}

func (b *streamBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		b.sawEOF = true
	}
	return n, err
}

// Close is called by the body's reader, once done reading.
func (b *streamBody) Close() error {
	b.closeOnce.Do(func() {
		reuse := b.sawEOF && !b.resp.Close && b.br != nil && b.br.Buffered() == 0 && b.requestSent() && !b.upgradeAsked
		b.ReadCloser.Close()
		b.finish(reuse)
		if b.br != nil {
			b.br.Reset(nil)
			readerPool.Put(b.br)
		}
	})
	return nil
}

// finish ends the exchange once: it keeps or closes the stream and frees
// the slot. Close calls it, or the request's end when the body is never
// closed (then from another goroutine: it touches nothing Read uses).
func (b *streamBody) finish(reuse bool) {
	b.once.Do(func() { b.done(reuse) })
}

// requestSent reports whether the whole request went out without error.
func (b *streamBody) requestSent() bool {
	if b.sent == nil {
		return true
	}
	select {
	case err := <-b.sent:
		return err == nil
	default:
		return false // still sending: the stream cannot carry another request
	}
}

// upgradedBody is the body of a 101 answer: after the switch the stream is a
// plain byte pipe both ways, as ReverseProxy expects of an upgrade.
type upgradedBody struct {
	*streamBody
	r *bufio.Reader
	w io.Writer
}

func (b *upgradedBody) Read(p []byte) (int, error)  { return b.r.Read(p) }
func (b *upgradedBody) Write(p []byte) (int, error) { return b.w.Write(p) }
