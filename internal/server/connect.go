package server

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"

	"wsp/internal/httperr"
	"wsp/internal/tunnel"
)

// connectAnswerTimeout bounds the wait for a client's answer to CONNECT.
const connectAnswerTimeout = time.Minute

// connect serves CONNECT host:port: a raw TCP tunnel through a client to
// host:port, for HTTPS, databases, SSH. The client's answer decides: 200
// and the app's connection becomes a byte pipe to the destination, anything
// else goes back to the app as is.
func (s *Server) connect(w http.ResponseWriter, r *http.Request) {
	target := r.Host
	x := &exchange{entry: "connect", dest: &url.URL{Host: target}}
	rec := &recorder{ResponseWriter: w}
	s.begin(r, x, rec)
	defer s.finish(r, x, rec)
	if host, port, err := net.SplitHostPort(target); err != nil || host == "" || port == "" {
		x.err = httperr.New(http.StatusBadRequest, httperr.BadDestination, "CONNECT %q: want host:port", target)
		httperr.Write(rec, x.err)
		return
	}
	if x.err = s.admit(r, x, target, target); x.err != nil {
		httperr.Write(rec, x.err)
		return
	}
	if s.forwarded(rec, r, x) {
		return
	}
	var tried []*session
	sess, st, _, err := s.transport.open(r.Context(), x, true, &tried)
	if err != nil {
		x.err = httperr.From(err)
		s.markOwn(rec, x)
		httperr.Write(rec, x.err)
		return
	}
	defer s.reg.release(sess)
	if sess.legacy != nil {
		x.err = httperr.New(http.StatusBadGateway, httperr.ClientError, "client %q speaks the legacy protocol, which has no CONNECT", sess.clientID)
		httperr.Write(rec, x.err)
		return
	}
	defer st.Close()

	// The client answers once it has dialled (within its dialtimeout).
	st.SetReadDeadline(time.Now().Add(connectAnswerTimeout))
	br, resp, err := askConnect(st, target, http.Header{})
	st.SetReadDeadline(time.Time{})
	if err != nil {
		x.err = httperr.Wrap(err, http.StatusBadGateway, httperr.TunnelBroken, "the session to client %q broke", sess.clientID)
		httperr.Write(rec, x.err)
		return
	}
	if resp.StatusCode != http.StatusOK {
		// The client's refusal or failure, with its wsp error code.
		relayAnswer(rec, resp)
		return
	}
	s.splice(rec, x, tunnel.End{Conn: st, Reader: br})
}

// relayAnswer passes a refused CONNECT's answer (a wsp error: status,
// X-Wsp-Error, one-line body) on to the app, without a cluster mark (see
// markOwn), which only the node that made it may set.
func relayAnswer(rec *recorder, resp *http.Response) {
	for k, v := range resp.Header {
		rec.Header()[k] = v
	}
	rec.Header().Del(headerClusterNode)
	rec.WriteHeader(resp.StatusCode)
	io.Copy(rec, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
}

// splice answers the app's CONNECT with 200 and joins its connection to
// far (a client's stream, or another node's connection) until either ends.
func (s *Server) splice(rec *recorder, x *exchange, far tunnel.End) {
	if !s.enter(&s.tunnels) {
		x.err = httperr.New(http.StatusServiceUnavailable, httperr.Draining, "server is shutting down")
		httperr.Write(rec, x.err)
		return
	}
	defer s.tunnels.Done()
	conn, brw, err := http.NewResponseController(rec).Hijack()
	if err != nil {
		x.err = httperr.Wrap(err, http.StatusInternalServerError, httperr.BadRequest, "cannot take over the connection")
		httperr.Write(rec, x.err)
		return
	}
	rec.status = http.StatusOK
	answer := "HTTP/1.1 200 Connection established\r\n"
	if x.node != "" {
		answer += "Via: 1.1 " + x.node + "\r\n" // served by another node
	}
	if _, err := io.WriteString(conn, answer+"\r\n"); err != nil {
		conn.Close()
		return
	}
	up, down := tunnel.Join(tunnel.End{Conn: conn, Reader: brw.Reader}, far, s.cfg.IdleTimeout.D())
	rec.bytes = down
	x.bytesIn.Store(up)
}

// askConnect sends a CONNECT for target, with header h, on rw and reads the
// answer; the reader may hold the first bytes of the tunnel.
func askConnect(rw io.ReadWriter, target string, h http.Header) (*bufio.Reader, *http.Response, error) {
	req := &http.Request{Method: http.MethodConnect, URL: &url.URL{Host: target}, Host: target, Header: h}
	bw := bufio.NewWriterSize(rw, 1024)
	err := req.Write(bw)
	if err == nil {
		err = bw.Flush()
	}
	if err != nil {
		return nil, nil, err
	}
	br := bufio.NewReader(rw)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		return nil, nil, err
	}
	return br, resp, nil
}
