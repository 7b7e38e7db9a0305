package server

import (
	"net/http"

	"wsp/internal/admin"
)

// AdminHandler serves the operators' listener: the dashboard at /, its JSON
// at /api/stats and /api/clients, /metrics, health and /debug/pprof/. With
// adminauth set, every path requires the apps' credentials (auth).
func (s *Server) AdminHandler() http.Handler {
	mux := admin.NewMux()
	mux.HandleFunc("GET /{$}", admin.Dashboard)
	mux.HandleFunc("GET /api/stats", func(w http.ResponseWriter, r *http.Request) { admin.JSON(w, s.Stats()) })
	mux.HandleFunc("GET /api/clients", func(w http.ResponseWriter, r *http.Request) {
		admin.JSON(w, map[string]any{"clients": s.ClientsInfo()})
	})
	mux.Handle("GET /metrics", s.metrics.Handler())
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { admin.Text(w, http.StatusOK, "ok") })
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) { admin.Text(w, http.StatusOK, "ok") })
	mux.HandleFunc("GET /readyz", s.readyz)
	if !s.cfg.AdminAuth {
		return mux
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if v := r.Header.Get("Authorization"); v == "" || !credentialOK(s.cfg.Auth, v) {
			w.Header()["WWW-Authenticate"] = []string{`Basic realm="wsp"`, `Bearer realm="wsp"`}
			admin.Text(w, http.StatusUnauthorized, "credentials required (adminauth)")
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// readyz fails as soon as a drain starts, so load balancers stop sending.
func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	if s.draining.Load() {
		admin.Text(w, http.StatusServiceUnavailable, "draining")
		return
	}
	admin.Text(w, http.StatusOK, "ok")
}
