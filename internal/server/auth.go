package server

import (
	"crypto/subtle"
	"encoding/base64"
	"net/http"
	"strings"

	"wsp/internal/config"
	"wsp/internal/httperr"
	"wsp/internal/tunnel"
)

// equal compares secrets in constant time (for equal lengths; the length
// itself is not secret enough to matter).
func equal(a, b string) bool {
	return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

// checkClient decides whether a registering client may take its id: by the
// shared secret, or by a token bound to that id. With neither configured,
// any client may register. 401 when the client sent no credential, 403 when
// it sent a wrong one.
func (s *Server) checkClient(h tunnel.Hello) *httperr.Error {
	secret, creds := s.cfg.SecretKey, s.cfg.Clients
	if secret == "" && len(creds) == 0 {
		return nil
	}
	if h.SecretKey == "" && h.Token == "" {
		return httperr.New(http.StatusUnauthorized, httperr.Unauthorized, "missing credentials: send %s or Authorization: Bearer TOKEN", tunnel.HeaderSecretKey)
	}
	if secret != "" && h.SecretKey != "" && equal(h.SecretKey, secret) {
		return nil
	}
	if h.Token != "" {
		tokenKnown := false
		for _, c := range creds {
			if equal(h.Token, c.Token) {
				if c.ID == h.ClientID {
					return nil
				}
				tokenKnown = true
			}
		}
		if tokenKnown {
			return httperr.New(http.StatusForbidden, httperr.Forbidden, "the token is not bound to client id %q", h.ClientID)
		}
		return httperr.New(http.StatusForbidden, httperr.Forbidden, "invalid token")
	}
	return httperr.New(http.StatusForbidden, httperr.Forbidden, "invalid %s", tunnel.HeaderSecretKey)
}

// authenticate checks an app's credentials when auth is configured. In
// proxy mode (and CONNECT) they come in Proxy-Authorization; on /request in
// Proxy-Authorization or, failing that, Authorization. The header used is
// removed, so the credential never reaches the destination.
func (s *Server) authenticate(r *http.Request, proxy bool) *httperr.Error {
	a := s.cfg.Auth
	if !a.Enabled() {
		return nil
	}
	header := "Proxy-Authorization"
	value := r.Header.Get(header)
	if value == "" && !proxy {
		header = "Authorization"
		value = r.Header.Get(header)
	}
	if value != "" && credentialOK(a, value) {
		r.Header.Del(header)
		return nil
	}
	msg := "missing credentials"
	if value != "" {
		msg = "invalid credentials"
	}
	if proxy {
		e := httperr.New(http.StatusProxyAuthRequired, httperr.Unauthorized, "%s: send Proxy-Authorization (Basic or Bearer)", msg)
		e.Challenge = "Proxy-Authenticate"
		return e
	}
	e := httperr.New(http.StatusUnauthorized, httperr.Unauthorized, "%s: send Authorization or Proxy-Authorization (Basic or Bearer)", msg)
	e.Challenge = "WWW-Authenticate"
	return e
}

// credentialOK checks a Basic or Bearer credential against a, comparing
// every candidate in constant time.
func credentialOK(a config.Auth, value string) bool {
	scheme, cred, ok := strings.Cut(value, " ")
	if !ok {
		return false
	}
	cred = strings.TrimSpace(cred)
	switch {
	case strings.EqualFold(scheme, "Bearer"):
		match := false
		for _, t := range a.Tokens {
			match = equal(cred, t) || match
		}
		return match
	case strings.EqualFold(scheme, "Basic"):
		b, err := base64.StdEncoding.DecodeString(cred)
		if err != nil {
			return false
		}
		user, pass, ok := strings.Cut(string(b), ":")
		want, known := a.Users[user]
		return ok && known && equal(pass, want)
	}
	return false
}
