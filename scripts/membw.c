/* Read bandwidth of this machine: the best of 50 passes summing a buffer of N MB (default 84)
 * with AVX2 over OMP_NUM_THREADS threads. Build: gcc -O3 -mavx2 -fopenmp scripts/membw.c -o membw */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <immintrin.h>
#include <omp.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  size_t mb = argc>1?atoi(argv[1]):84; size_t n = mb<<20;
  char*buf = aligned_alloc(64,n); memset(buf,1,n);
  int reps=50; double best=1e9; long sink=0;
  for(int r=0;r<reps;r++){
    double t=now();
    #pragma omp parallel reduction(+:sink)
    {
      int tid=omp_get_thread_num(), nt=omp_get_num_threads();
      size_t lo=n/nt*tid, hi=n/nt*(tid+1);
      __m256i a=_mm256_setzero_si256();
      for(size_t i=lo;i<hi;i+=64){ a=_mm256_add_epi8(a,_mm256_load_si256((__m256i*)(buf+i))); a=_mm256_add_epi8(a,_mm256_load_si256((__m256i*)(buf+i+32)));}
      sink+=_mm256_extract_epi8(a,0);
    }
    double dt=now()-t; if(dt<best)best=dt;
  }
  printf("%zu MB: best %.2f ms, %.1f GB/s (%d threads) [%d]\n", mb, best*1e3, n/best/1e9, omp_get_max_threads(), (int)sink);
}
