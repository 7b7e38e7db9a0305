package server

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"sync"

	"wsp/internal/config"
)

// certStore holds the server's certificate and client CA, replaced whole by
// Reload so sessions and handshakes in progress keep what they started with.
type certStore struct {
	cfg config.ServerTLS

	mu       sync.RWMutex
	cert     *tls.Certificate // guarded by mu
	clientCA *x509.CertPool   // guarded by mu; nil without mutual TLS
}

func newCertStore(cfg config.ServerTLS) (*certStore, error) {
	c := &certStore{cfg: cfg}
	return c, c.Reload()
}

// Reload reads the certificate, key and client CA files again. On error the
// previous ones stay in use.
func (c *certStore) Reload() error {
	cert, err := tls.LoadX509KeyPair(c.cfg.Cert, c.cfg.Key)
	if err != nil {
		return fmt.Errorf("tls: %w", err)
	}
	var pool *x509.CertPool
	if c.cfg.ClientCA != "" {
		if pool, err = config.LoadCertPool(c.cfg.ClientCA); err != nil {
			return fmt.Errorf("tls.clientca: %w", err)
		}
	}
	c.mu.Lock()
	c.cert, c.clientCA = &cert, pool
	c.mu.Unlock()
	return nil
}

// config returns the listener's TLS configuration, which consults the store
// at every handshake.
func (c *certStore) config() *tls.Config {
	base := &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: []string{"http/1.1"}}
	base.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		c.mu.RLock()
		defer c.mu.RUnlock()
		cfg := base.Clone()
		cfg.GetConfigForClient = nil
		cfg.Certificates = []tls.Certificate{*c.cert}
		if c.clientCA != nil {
			cfg.ClientAuth = tls.RequireAndVerifyClientCert
			cfg.ClientCAs = c.clientCA
		}
		return cfg, nil
	}
	return base
}
