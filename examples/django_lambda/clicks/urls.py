from django.urls import path

from clicks import views

urlpatterns = [
    path("clicks/<str:name>", views.click),
    path("clicks/<str:name>/fanout", views.fanout),
]
