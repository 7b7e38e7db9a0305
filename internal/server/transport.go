package server

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/hashicorp/yamux"

	"wsp/internal/httperr"
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
	reg     *registry
	timeout time.Duration // how long to wait for a session able to serve
}

func (t *transport) RoundTrip(req *http.Request) (*http.Response, error) {
	x := exchangeOf(req.Context())
	var tried []*session
	for {
		s, err := t.reg.pick(req.Context(), x.clientID, tried, t.timeout)
		if err != nil {
			return nil, err
		}
		x.sessionID, x.clientID = s.id, s.clientID
		st, err := s.OpenStream()
		if err != nil {
			t.reg.release(s)
			if tunnel.IsSessionGone(err) {
				// Nothing was sent: another session may serve it.
				s.gone.Store(true)
				tried = append(tried, s)
				continue
			}
			return nil, httperr.Wrap(err, http.StatusBadGateway, httperr.TunnelBroken, "opening a stream to client %q failed", s.clientID)
		}
		s.requests.Add(1)
		return t.exchange(req, s, st)
	}
}

// exchange sends req on st and returns the response, whose Body owns the
// stream and the session's slot until closed.
func (t *transport) exchange(req *http.Request, s *session, st *yamux.Stream) (*http.Response, error) {
	done := func() {
		st.Close()
		t.reg.release(s)
	}
	broken := func(err error) error {
		return httperr.Wrap(err, http.StatusBadGateway, httperr.TunnelBroken, "the session to client %q broke", s.clientID)
	}
	// Unblock a pending read when the app goes away; closing the stream
	// tells the client to abandon the request.
	stop := context.AfterFunc(req.Context(), func() {
		st.SetReadDeadline(time.Now())
		st.Close()
	})

	bw := writerPool.Get().(*bufio.Writer)
	bw.Reset(st)
	if req.Body == nil || req.Body == http.NoBody {
		err := req.WriteProxy(bw)
		if err == nil {
			err = bw.Flush()
		}
		bw.Reset(nil)
		writerPool.Put(bw)
		if err != nil {
			stop()
			done()
			return nil, broken(err)
		}
	} else {
		// The body streams while the answer is read: the client may answer
		// (a refusal, an early error) before the body is complete. This
		// goroutine ends when the body does or the stream closes; http.Server
		// ends the body once the handler returns, so it never outlives the
		// request by more than that.
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
		}()
	}

	br := readerPool.Get().(*bufio.Reader)
	br.Reset(st)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		stop()
		br.Reset(nil)
		readerPool.Put(br)
		done()
		if cerr := req.Context().Err(); cerr != nil {
			return nil, cerr
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			err = fmt.Errorf("stream closed before a response: %w", err)
		}
		return nil, broken(err)
	}
	b := &streamBody{ReadCloser: resp.Body, br: br, close: func() { stop(); done() }}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		// ReverseProxy may still read an upgraded body after closing it,
		// so its reader is never recycled.
		b.br = nil
		resp.Body = &upgradedBody{streamBody: b, r: br, w: st}
	} else {
		resp.Body = b
	}
	return resp, nil
}

// streamBody is a response body read from a stream. Close ends the stream
// and frees the session slot; it is idempotent.
type streamBody struct {
	io.ReadCloser
	br    *bufio.Reader // recycled on Close; nil when it must not be
	once  sync.Once
	close func()
}

func (b *streamBody) Close() error {
	b.once.Do(func() {
		b.close()
		if b.br != nil {
			b.br.Reset(nil)
			readerPool.Put(b.br)
		}
	})
	return nil
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
