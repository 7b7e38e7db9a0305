package server

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
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
// back to the access log. The request's goroutine owns it; the goroutine
// sending the app's body on touches only its atomic fields.
type exchange struct {
	id        string // X-Request-Id
	entry     string // "request", "proxy" or "connect": how the app reached us
	dest      *url.URL
	want      wanted // which sessions may serve it
	clientID  string // the client that served it
	sessionID string
	session   *session
	start     time.Time
	end       func(client string, status int, in, out int64, d time.Duration) // metrics
	bytesIn   atomic.Int64                                                    // body bytes from the app, counted as they are read
	err       *httperr.Error
	// bodyTooLarge: the app's body went past maxbodybytes, so whatever
	// came back is moot. Set by the goroutine sending the body.
	bodyTooLarge atomic.Bool
	bodyLimit    int64
	// Cluster (see cluster.go): via is the node that forwarded this
	// request here, authenticated by the cluster secret ("" = an app sent
	// it); node is the node this one forwarded it to; fwd is set when this
	// node forwards it; upgraded: the node answered 101, and the request
	// is counted in s.tunnels.
	via      string
	node     string
	fwd      *forwarding
	upgraded bool
}

// limitedBody fails a request body at its limit and notes why on x.
type limitedBody struct {
	io.ReadCloser
	left int64
	x    *exchange
}

func (b *limitedBody) Read(p []byte) (int, error) {
	if b.left <= 0 {
		// One byte more tells a body at the limit from one beyond it.
		var one [1]byte
		if n, _ := b.ReadCloser.Read(one[:]); n > 0 {
			b.x.bodyTooLarge.Store(true)
			return 0, errBodyTooLarge
		}
		return b.ReadCloser.Read(p)
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.ReadCloser.Read(p)
	b.left -= int64(n)
	return n, err
}

var errBodyTooLarge = errors.New("request body too large")

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

var copyBuffers = &bufferPool{sync.Pool{New: func() any { b := make([]byte, tunnel.CopyBufferSize); return &b }}}

// bufferPool spares ReverseProxy a copy buffer allocation per request.
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
			if x.via != "" {
				// Forwarded by another node, which set them as the
				// destination must see them: the app's, not that node's.
				for _, h := range forwardedHeaders {
					if v := pr.In.Header[h]; v != nil {
						pr.Out.Header[h] = v
					}
				}
			} else {
				pr.SetXForwarded()
			}
			for name := range pr.Out.Header {
				if strings.HasPrefix(name, proxyHeaderPrefix) {
					delete(pr.Out.Header, name)
				}
			}
		},
		Transport: s.transport,
		ModifyResponse: func(resp *http.Response) error {
			noteAnswer(resp, exchangeOf(resp.Request.Context()))
			return nil
		},
		ErrorLog:     slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		BufferPool:   copyBuffers,
		ErrorHandler: s.proxyError,
	}
}

// noteAnswer is what both reverse proxies (to a client, to another node)
// do with an answer: the app gets the relay's X-Request-Id, set before,
// not a copy; a cluster mark that is not this node's own is dropped (see
// markOwn); a wsp error in it is recorded on x.
func noteAnswer(resp *http.Response, x *exchange) {
	resp.Header.Del(headerRequestID)
	resp.Header.Del(headerClusterNode)
	if code := resp.Header.Get(httperr.Header); code != "" && resp.StatusCode >= 400 {
		x.err = clientError(resp, code)
	}
}

// proxyError is the ErrorHandler of both reverse proxies: it answers the
// app with the failure, unless the app went away.
func (s *Server) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	x := exchangeOf(r.Context())
	switch {
	case x.bodyTooLarge.Load():
		x.err = httperr.New(http.StatusRequestEntityTooLarge, httperr.BodyTooLarge, "request body exceeds the limit of %d bytes (maxbodybytes)", x.bodyLimit)
	case r.Context().Err() != nil && s.life.Err() != nil:
		x.err = httperr.Wrap(err, http.StatusServiceUnavailable, httperr.Draining, "server is shutting down")
	case r.Context().Err() != nil:
		appGone(x, err)
		return
	default:
		x.err = httperr.From(err)
	}
	if x.fwd != nil {
		x.fwd.result = x.err.Code
	}
	s.markOwn(w, x)
	httperr.Write(w, x.err)
}

// clientError is the failure a client reported in its answer (its one-line
// body, read ahead and put back), for logs, metrics and the dashboard.
func clientError(resp *http.Response, code string) *httperr.Error {
	head := make([]byte, 512)
	n, _ := io.ReadFull(resp.Body, head)
	head = head[:n]
	resp.Body = struct {
		io.Reader
		io.Closer
	}{io.MultiReader(bytes.NewReader(head), resp.Body), resp.Body}
	msg, _, _ := strings.Cut(string(head), "\n")
	return httperr.New(resp.StatusCode, code, "%s", msg)
}

// relay sends r to dest through a client and streams the answer back.
func (s *Server) relay(w http.ResponseWriter, r *http.Request, entry string, dest *url.URL) {
	x := &exchange{entry: entry, dest: dest}
	rec := &recorder{ResponseWriter: w}
	s.begin(r, x, rec)
	defer s.finish(r, x, rec)
	if x.err = s.admit(r, x, dest.String(), dest.Host); x.err != nil {
		httperr.Write(rec, x.err)
		return
	}
	if s.forwarded(rec, r, x) {
		return
	}
	s.proxy.ServeHTTP(rec, r.WithContext(context.WithValue(r.Context(), exchangeKey{}, x)))
}

// admit checks r against the server's rules (target is what they match:
// the URL, or host:port for CONNECT) and decides which sessions may serve
// it: the client the app names, else the first route matching host, else
// any client whose advertised rules accept it.
func (s *Server) admit(r *http.Request, x *exchange, target, host string) *httperr.Error {
	// A node request was authenticated by the cluster secret, and the app
	// by the node it reached first; the server's rules apply all the same.
	if x.via = viaOf(r.Context()); x.via == "" {
		if e := s.authenticate(r, x.entry != "request"); e != nil {
			return e
		}
	}
	if tunnel.UpgradeType(r.Header) != "" && r.Body != nil && r.Body != http.NoBody && r.ContentLength != 0 {
		// After a 101 the stream is a byte pipe: a body in flight would
		// mix into it.
		return httperr.New(http.StatusBadRequest, httperr.BadRequest, "a protocol upgrade cannot carry a request body")
	}
	if max := int64(s.cfg.MaxBodyBytes); max > 0 && r.Body != nil {
		if r.ContentLength > max {
			return httperr.New(http.StatusRequestEntityTooLarge, httperr.BodyTooLarge, "request body of %d bytes exceeds the limit of %d (maxbodybytes)", r.ContentLength, max)
		}
		x.bodyLimit = max
		r.Body = &limitedBody{ReadCloser: r.Body, left: max, x: x}
	}
	if err := s.rules.Check(r.Method, target, r.Header); err != nil {
		return httperr.New(http.StatusForbidden, httperr.ServerRefused, "refused by the server's rules: %s %s: %s", r.Method, redact(target), err)
	}
	id := r.Header.Get(headerClient)
	if id == "" && x.entry != "request" && !s.cfg.Auth.Enabled() {
		// A proxy setting can carry a client id as its user name:
		// http://dc1@relay:8080. With auth on, the user name is the app's.
		id = proxyUser(r)
	}
	if id != "" && !tunnel.ValidID(id) {
		return httperr.New(http.StatusBadRequest, httperr.BadRequest, "%q is not a valid client id (from %s or the proxy user name)", id, headerClient)
	}
	if id == "" {
		id = s.route(host)
	}
	method, header := r.Method, r.Header
	x.want = wanted{clientID: id, dest: redact(target), accepts: func(c *session) bool {
		return c.rules.Check(method, target, header) == nil
	}}
	return nil
}

// route returns the client of the first route whose host pattern matches.
func (s *Server) route(host string) string {
	for _, rt := range s.routes {
		if rt.host.MatchString(host) {
			return rt.client
		}
	}
	return ""
}

// proxyUser is the user name of a Basic Proxy-Authorization header.
func proxyUser(r *http.Request) string {
	auth := r.Header.Get("Proxy-Authorization")
	scheme, cred, ok := strings.Cut(auth, " ")
	if !ok || !strings.EqualFold(scheme, "Basic") {
		return ""
	}
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(cred))
	if err != nil {
		return ""
	}
	user, _, _ := strings.Cut(string(b), ":")
	return user
}

// redact drops the user info and query of a URL for messages and logs.
func redact(target string) string {
	u, err := url.Parse(target)
	if err != nil || u.Host == "" {
		return target
	}
	u.User, u.RawQuery, u.Fragment = nil, "", ""
	return u.String()
}

func writeError(w http.ResponseWriter, err error) {
	var e *httperr.Error
	if !errors.As(err, &e) {
		e = httperr.From(err)
	}
	httperr.Write(w, e)
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
