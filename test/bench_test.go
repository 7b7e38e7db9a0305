package test

import (
	"io"
	"net/http"
	"testing"
)

// BenchmarkRelaySmallGet measures small GETs through server and client, in
// one process, with b.SetParallelism-many concurrent apps per core.
func BenchmarkRelaySmallGet(b *testing.B) {
	r, be := setup(b, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "a small answer, like most API calls give")
	}))
	tr := &http.Transport{MaxIdleConnsPerHost: 256}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	b.SetParallelism(parallelism)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			req, _ := http.NewRequest("GET", r.url+"/request", nil)
			req.Header.Set("X-Proxy-Destination", be.URL+"/small")
			resp, err := hc.Do(req)
			if err != nil {
				b.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				b.Errorf("status %d", resp.StatusCode)
				return
			}
		}
	})
}

var parallelism = 32

// BenchmarkDirectSmallGet is the baseline: the same GETs, straight to the
// backend.
func BenchmarkDirectSmallGet(b *testing.B) {
	be := backend(b, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "a small answer, like most API calls give")
	}))
	tr := &http.Transport{MaxIdleConnsPerHost: 256}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	b.SetParallelism(parallelism)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			resp, err := hc.Get(be.URL + "/small")
			if err != nil {
				b.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	})
}
