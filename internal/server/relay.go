package server

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"time"

	"wsp/internal/httperr"
	"wsp/internal/tunnel"
)

// Headers an app uses to steer the relay; every X-Proxy-* header is removed
// before the destination.
const (
	headerDestination = "X-Proxy-Destination"
	headerClient      = "X-Proxy-Client"
	proxyHeaderPrefix = "X-Proxy-"
)

// exchange is what the relay knows about one app request, carried in its
// context from the handler through the ReverseProxy to the transport and
// back to the access log. Only the request's goroutine touches it.
type exchange struct {
	entry     string // "request" or "proxy": how the app reached us
	dest      *url.URL
	clientID  string // asked for by the app, then the one that served
	sessionID string
	err       *httperr.Error
}

type exchangeKey struct{}

func exchangeOf(ctx context.Context) *exchange {
	return ctx.Value(exchangeKey{}).(*exchange)
}

// parseDestination reads a root-gg/wsp style destination header.
func parseDestination(raw string) (*url.URL, error) {
	if raw == "" {
		return nil, httperr.New(http.StatusBadRequest, httperr.BadDestination, "missing %s header: it must hold the absolute URL to relay to", headerDestination)
	}
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return nil, httperr.New(http.StatusBadRequest, httperr.BadDestination, "%s %q is not an absolute URL", headerDestination, raw)
	}
	switch u.Scheme {
	case "http", "https":
	case "ws":
		u.Scheme = "http"
	case "wss":
		u.Scheme = "https"
	default:
		return nil, httperr.New(http.StatusBadRequest, httperr.BadDestination, "%s %q: scheme must be http, https, ws or wss", headerDestination, raw)
	}
	return u, nil
}

var copyBuffers = &bufferPool{sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}}

// bufferPool spares ReverseProxy a 32 KiB allocation per request.
type bufferPool struct{ p sync.Pool }

func (b *bufferPool) Get() []byte  { return *b.p.Get().(*[]byte) }
func (b *bufferPool) Put(p []byte) { b.p.Put(&p) }

func (s *Server) newProxy() *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			x := exchangeOf(pr.In.Context())
			dest := *x.dest
			pr.Out.URL = &dest
			pr.Out.Host = ""
			pr.SetXForwarded()
			for name := range pr.Out.Header {
				if strings.HasPrefix(name, proxyHeaderPrefix) {
					delete(pr.Out.Header, name)
				}
			}
		},
		Transport:  &transport{reg: s.reg, timeout: s.cfg.Timeout.D()},
		ErrorLog:   slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		BufferPool: copyBuffers,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			x := exchangeOf(r.Context())
			if r.Context().Err() != nil {
				x.err = httperr.Wrap(err, 499, "app_gone", "the app went away")
				return
			}
			x.err = httperr.From(err)
			httperr.Write(w, x.err)
		},
	}
}

// relay sends r to dest through a client and streams the answer back.
func (s *Server) relay(w http.ResponseWriter, r *http.Request, entry string, dest *url.URL) {
	start := time.Now()
	x := &exchange{entry: entry, dest: dest, clientID: r.Header.Get(headerClient)}
	rec := &recorder{ResponseWriter: w}
	defer func() { s.logAccess(r, x, rec, start) }()

	if x.clientID != "" && !tunnel.ValidID(x.clientID) {
		x.err = httperr.New(http.StatusBadRequest, httperr.BadRequest, "%s %q is not a valid client id", headerClient, x.clientID)
		httperr.Write(rec, x.err)
		return
	}
	if err := s.rules.Check(r.Method, dest.String(), r.Header); err != nil {
		x.err = httperr.New(http.StatusForbidden, httperr.ServerRefused, "refused by the server's rules: %s %s %s", r.Method, dest.Redacted(), err)
		httperr.Write(rec, x.err)
		return
	}
	s.proxy.ServeHTTP(rec, r.WithContext(context.WithValue(r.Context(), exchangeKey{}, x)))
}

func writeError(w http.ResponseWriter, err error) {
	var e *httperr.Error
	if !errors.As(err, &e) {
		e = httperr.From(err)
	}
	httperr.Write(w, e)
}

func (s *Server) logAccess(r *http.Request, x *exchange, rec *recorder, start time.Time) {
	attrs := []any{
		"entry", x.entry,
		"client", x.clientID,
		"session", x.sessionID,
		"method", r.Method,
		"host", x.dest.Host,
		"status", rec.status,
		"bytes_out", rec.bytes,
		"duration", time.Since(start).Round(time.Microsecond),
	}
	if x.err != nil {
		attrs = append(attrs, "error", x.err.Code, "cause", x.err.Error())
	}
	s.log.Info("request", attrs...)
}

// recorder notes the status and size of an answer for the access log. It
// unwraps, so ReverseProxy still finds the Flusher and Hijacker beneath.
type recorder struct {
	http.ResponseWriter
	status int
	bytes  int64
}

func (r *recorder) WriteHeader(code int) {
	if r.status == 0 && code >= 200 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(p []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	n, err := r.ResponseWriter.Write(p)
	r.bytes += int64(n)
	return n, err
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }
